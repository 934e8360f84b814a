"""Progress bars: tqdm on a terminal, a few whole lines in a file or pipe."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import tqdm.auto

from medaug.progress import LogLines, progress_bar

ROOT = Path(__file__).resolve().parents[1]


def log_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").split("\n") if line.strip()]


def test_a_bar_into_a_file_writes_about_ten_lines_for_800_steps(tmp_path):
    code = (
        "import time\nfrom medaug.progress import progress_bar\n"
        "bar = progress_bar(range(800), desc='train', unit='step')\n"
        "for i in bar:\n    time.sleep(0.001)\n    if i % 200 == 0:\n        bar.set_postfix(loss=f'{i:.1f}')\n"
    )
    log = tmp_path / "log.txt"
    with open(log, "w") as err:
        subprocess.run(
            [sys.executable, "-c", code], stderr=err, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
    text = log.read_text()
    lines = log_lines(text)
    assert "\r" not in text and 3 <= len(lines) <= 15  # tqdm.auto: one line per redraw (~every 0.1 s)
    assert lines[0].startswith("train:   0%") and "800/800" in lines[-1] and lines[-1].startswith("train: 100%")
    done = [int(line.split("|")[2].split("/")[0]) for line in lines]
    assert done == sorted(done) and len(set(done)) == len(done)  # each line a step forward, none repeated


def test_a_bar_without_total_logs_by_time_and_disabled_bars_stay_silent():
    stream = io.StringIO()

    def slow():
        for i in range(12):
            time.sleep(0.03)
            yield i

    assert list(progress_bar(slow(), desc="index", file=stream, log_interval=0.1)) == list(range(12))
    lines = log_lines(stream.getvalue())
    assert 3 <= len(lines) <= 13 and lines[-1].startswith("index: 12") and "\r" not in stream.getvalue()
    quiet = io.StringIO()
    assert sum(progress_bar(range(5), file=quiet, disable=True)) == 10 and quiet.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_is_plain_tqdm():
    stream = Terminal()
    bar = progress_bar(range(50), desc="sample", file=stream, mininterval=0)
    assert type(bar) is tqdm.auto.tqdm and not isinstance(bar, LogLines)
    assert sum(bar) == sum(range(50))
    text = stream.getvalue()
    assert text.count("\r") > 10 and "50/50" in text.rsplit("\r", 1)[-1]  # redrawn in place, as tqdm does
    assert isinstance(progress_bar(range(3), file=io.StringIO()), LogLines)
