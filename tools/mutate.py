"""A small mutation check: plant deliberate bugs, one at a time, in a copy of the working tree and
see whether the tests notice.

    python tools/mutate.py                 # every mutant against the tests named for it
    python tools/mutate.py --full          # every mutant against the whole suite (slow: ~5 min each)
    python tools/mutate.py --only lr_off_by_one,rng_not_restored

Each mutant is a literal replacement (it must match exactly once, so a refactor that moves the
code makes the mutant fail loudly instead of silently testing nothing) and the tests that should
catch it. The list holds the seven bugs issue #17 found the suite blind to, and bugs of the same
kind in the code written since. mutmut and cosmic-ray were considered: they generate thousands of
operator mutants, far more than CI's 90 minutes on 2 cores allow with end-to-end training tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


MUTANTS = [
    Mutant("lr_off_by_one", "ramgpt/train/loop.py", "lr = run.schedule.lr_at(step)",
           "lr = run.schedule.lr_at(step - 1)",
           ("tests/test_train.py::test_the_lr_logged_at_every_step_is_the_schedules_value_for_that_step",),
           "train takes the lr of the step before"),
    Mutant("metrics_not_trimmed_on_resume", "ramgpt/sinks/jsonl.py",
           "            self.truncate_after(self.run_dir, resume_step)", "            pass",
           ("tests/test_train.py::test_resume_after_sigkill_from_a_periodic_checkpoint_with_dropout_is_exact",),
           "resume keeps metrics.jsonl rows past the checkpoint"),
    Mutant("rng_not_restored", "ramgpt/train/setup.py",
           '    ckpt.restore_rng_state(per_rank[rank] if len(per_rank) == world else meta["rng"])', "    pass",
           ("tests/test_train.py::test_resume_after_sigkill_from_a_periodic_checkpoint_with_dropout_is_exact",),
           "resume does not restore the RNG state"),
    Mutant("ctrl_c_exits_0", "ramgpt/cli.py", "        raise typer.Exit(130)", "        raise typer.Exit(0)",
           ("tests/test_cli.py::test_ctrl_c_exits_130_after_saving",),
           "Ctrl-C exits 0 instead of 130"),
    Mutant("always_a_terminal", "ramgpt/sinks/__init__.py", "        return sys.stdout.isatty()", "        return True",
           ("tests/test_sinks.py",), "terminal detection always says terminal"),
    Mutant("fallback_deletes_old_first", "ramgpt/checkpoint/store.py",
           '    old = tmp.with_name(tmp.name + "-old")\n    os.rename(final, old)',
           '    old = tmp.with_name(tmp.name + "-old")\n    os.rename(final, old)\n    remove_tree_quietly(old)',
           ("tests/test_checkpoint.py",), "the re-save fallback deletes the old copy before renaming the new one"),
    Mutant("streamer_drops_held_text", "ramgpt/generate.py",
           "        else:\n            full = self._decode(self._ids)\n"
           "            text, self._emitted_chars = full[self._emitted_chars :], len(full)",
           "        else:\n            full = self._decode(self._ids)\n"
           "            text, self._emitted_chars = \"\", len(full)",
           ("tests/test_generate.py",), "Utf8Streamer.flush drops held-back text on the non-byte-level path"),
    Mutant("norm_flag_read_late", "ramgpt/engine/gradpath.py",
           "                self._add_on_cpu(idx, grads, last_pass)", "                self._add_on_cpu(idx, grads, self.last_pass)",
           ("tests/test_train.py::test_interrupted_then_resumed_reproduces_losses",),
           "the gradient worker reads the last-pass flag when it runs, not when the pass was queued"),
    Mutant("no_clip", "ramgpt/engine/streamed.py", "self.adamw.start(lr, 1.0 / (factor * coef),",
           "self.adamw.start(lr, 1.0 / factor,", ("tests/test_engine.py",), "the streamed engine forgets to clip"),
    Mutant("data_position_not_restored", "ramgpt/train/setup.py", '    data.load_state_dict(meta["data_state"])',
           "    pass", ("tests/test_train.py::test_interrupted_then_resumed_reproduces_losses",),
           "resume starts the data stream from the beginning"),
    Mutant("no_run_dir_lock", "ramgpt/train/rundir.py", "            self._lock()", "            pass",
           ("tests/test_train_rundir.py",), "two trainings can share a run directory"),
    Mutant("max_steps_stretches_schedule", "ramgpt/schedule.py",
           "else saved.decay_end,", "else fresh.decay_end,", ("tests/test_schedule.py",),
           "a resume with more steps stretches the cosine"),
    Mutant("background_save_no_gate", "ramgpt/train/checkpointer.py", "            while self._pending & ptrs:",
           "            while False:", ("tests/test_train_checkpointer.py",),
           "a background save lets the optimizer overwrite tensors it has not written"),
    Mutant("tied_copy_not_waited", "ramgpt/engine/streamed.py", "            for j in self._tied_from[idx]:",
           "            for j in ():", ("tests/test_dist.py::test_two_ranks_give_the_losses_of_one",),
           "with several ranks the head's copy of the embedding is refreshed before the embedding's update"),
]


def _copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def run(mutant: Mutant, full: bool) -> tuple[bool, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        target = tree / mutant.file
        text = target.read_text(encoding="utf-8")
        if text.count(mutant.old) != 1:
            raise SystemExit(f"mutant {mutant.name}: the code to change occurs {text.count(mutant.old)} times in "
                             f"{mutant.file}; update tools/mutate.py")
        target.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        tests = [] if full else list(mutant.tests)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                             cwd=tree, env=env, capture_output=True, text=True)
        failed = [ln for ln in res.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        last = failed[0] if failed else (res.stdout.strip().splitlines() or [""])[-1]
        return res.returncode != 0, time.perf_counter() - t0, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="run the whole suite against each mutant")
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    a = ap.parse_args()
    chosen = [m for m in MUTANTS if not a.only or m.name in a.only.split(",")]
    caught = 0
    print(f"{'mutant':<32} {'result':<8} {'time':>6}  what")
    for m in chosen:
        ok, secs, last = run(m, a.full)
        caught += ok
        print(f"{m.name:<32} {'caught' if ok else 'MISSED':<8} {secs:>5.0f}s  {m.what}", flush=True)
        print(f"{'':<32} {last[:150]}", flush=True)
    print(f"{caught} of {len(chosen)} mutants caught")
    raise SystemExit(0 if caught == len(chosen) else 1)


if __name__ == "__main__":
    main()
