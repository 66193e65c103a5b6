"""Capture what a terminal shows while a command runs: for putting the live panel in docs/.

    python bench/capture_panel.py --out DIR [--cols 140 --rows 45] [--ctrl-c-after S] -- CMD...

CMD runs on a fresh pseudo-terminal (its controlling terminal, so Ctrl-C is a real ``^C`` typed
into it, delivered by the kernel's line discipline), and its output is fed to ``pyte``, a
terminal emulator, the way a terminal would draw it. Written to DIR:

- ``screen-live.txt``: the last screen seen while CMD was still running (before any Ctrl-C), taken
  when the output had been quiet for 0.1 s, so never in the middle of a redraw;
- ``screen-final.txt``: the screen after CMD exited;
- ``capture.json``: exit status, seconds, whether the cursor was left visible, snapshot times.

Needs ``pyte`` (a pure-Python terminal emulator; not a ramgpt dependency). Used where tmux is
missing, e.g. on the GPU machines: the CPU test suite uses tmux (tests/test_tui_terminal.py).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte


def _set_ctty() -> None:  # in the child, after setsid: the pty becomes its controlling terminal
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cols", type=int, default=140)
    ap.add_argument("--rows", type=int, default=45)
    ap.add_argument("--ctrl-c-after", type=float, default=None, help="type ^C after this many seconds")
    ap.add_argument("--timeout", type=float, default=540.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command given")
    a.out.mkdir(parents=True, exist_ok=True)

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", a.rows, a.cols, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(a.cols), "LINES": str(a.rows)}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                            preexec_fn=_set_ctty, close_fds=True)
    os.close(slave)

    screen = pyte.Screen(a.cols, a.rows)
    stream = pyte.ByteStream(screen)
    t0 = time.monotonic()
    live: list[str] | None = None
    snaps: list[float] = []
    sent_ctrl_c = None
    rc = None
    while True:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the pty has gone
                data = b""
            if data:
                stream.feed(data)
            elif proc.poll() is not None:
                break
        now = time.monotonic() - t0
        if not r and sent_ctrl_c is None and proc.poll() is None:  # 0.1 s quiet: between two redraws
            live = list(screen.display)
            snaps.append(round(now, 2))
        if a.ctrl_c_after is not None and sent_ctrl_c is None and now >= a.ctrl_c_after and proc.poll() is None:
            os.write(master, b"\x03")
            sent_ctrl_c = now
        if now > a.timeout and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it exited between the poll and the kill
                pass
        if proc.poll() is not None and not r:
            break
    rc = proc.wait()
    os.close(master)

    def dump(lines: list[str] | None) -> str:
        return "\n".join(line.rstrip() for line in (lines or [])).rstrip() + "\n"

    (a.out / "screen-live.txt").write_text(dump(live), encoding="utf-8")
    (a.out / "screen-final.txt").write_text(dump(screen.display), encoding="utf-8")
    info = {"cmd": cmd, "exit_status": rc, "seconds": round(time.monotonic() - t0, 2), "ctrl_c_at_s": sent_ctrl_c,
            "cursor_visible_at_end": not screen.cursor.hidden, "cols": a.cols, "rows": a.rows,
            "last_live_snapshot_s": snaps[-1] if snaps else None}
    (a.out / "capture.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
