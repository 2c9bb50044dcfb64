"""Progress lines on stderr, shared by sample.py and train.py.

On a terminal one line per stage is redrawn after every step (`\\r`). Redirected to a
file or a pipe, `\\r` would make one endless line, so complete lines are written instead:
one about every tenth of the stage (and the last step), each with the rate and the ETA.
"""

import sys
import time

import torch


def clock(seconds: float) -> str:
    """Seconds -> H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def rate(seconds_per_step: float) -> str:
    if seconds_per_step <= 0:
        return "- it/s"
    if seconds_per_step < 1:
        return f"{1 / seconds_per_step:.2f} it/s"
    return f"{seconds_per_step:.2f} s/it"


class Progress:
    """One stage of `total` steps: `step()` after each; rate and ETA on stderr."""

    def __init__(self, label: str, total: int, device=None, stream=None, tty: bool | None = None):
        self.label, self.total, self.device = label, total, torch.device(device or "cpu")
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = max(1, round(total / 10))  # lines written when not on a terminal
        self.start = time.perf_counter()
        self.done = 0

    def step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest step times
        self.done += 1
        elapsed = time.perf_counter() - self.start
        per = elapsed / self.done
        last = self.done == self.total
        if last:
            line = f"{self.label}  {self.total} steps in {clock(elapsed)}  {rate(per)}"
        else:
            eta = clock((self.total - self.done) * per)
            line = f"{self.label}  step {self.done}/{self.total}  {rate(per)}  ETA {eta}"
        if self.tty:
            self.stream.write("\r" + line + ("   \n" if last else "   "))
        elif last or self.done % self.every == 0:
            self.stream.write(line + "\n")
        self.stream.flush()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


class _Null:
    def write(self, _):
        pass

    def flush(self):
        pass

    def isatty(self):
        return False


def quiet(label: str, total: int, device=None) -> Progress:
    """A Progress that writes nothing (library calls and tests); it still times."""
    return Progress(label, total, device, stream=_Null())
