# Sourced by the bench/gpu_*.sh scripts after they set $log: records the machine and software
# at the top of the log, and gives run LIMIT CMD... (the command's output and exit status go to
# the log; it is stopped after LIMIT seconds).
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; df -h /tmp /dev/shm
  python3 -c "import torch, ramtorch; print('torch', torch.__version__, 'ramtorch', ramtorch.__version__)"; } >>"$log" 2>&1
run() {  # LIMIT CMD...
  local limit=$1; shift
  echo "== $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "rc=$?" >>"$log"
}
