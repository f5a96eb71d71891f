"""Logging: a log file per command in its run folder, -v and -q on the terminal, task logs with times."""

from __future__ import annotations

import logging
import os
import re
import time

from jobs.cli import main


def _command_log(run_dir, command: str) -> str:
    files = sorted((run_dir / "logs").glob(f"{command}-*.log"))
    assert len(files) == 1, files
    return files[0].read_text()


def test_a_command_logs_to_the_terminal_and_in_full_to_its_own_file(make_dataset, tmp_path, capsys):
    source = make_dataset(cases_per_class=1, images_per_case=2)
    args = ["tile", "--no-progress", f"data.source={source}", f"run.root={tmp_path}", "split.val_fraction=0"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "1 shard(s) written, 0 already complete; 90 tiles" in out and err == ""
    text = _command_log(tmp_path / "default", "tile")
    lines = text.splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.match(stamp + r" DEBUG   jobs\.cli: lymphoma \S+: tile --no-progress data\.source=", lines[0])
    assert re.search(stamp + r" INFO    jobs\.tile: run folder: ", text)  # what the terminal showed, with its time
    assert "1 shard(s) written, 0 already complete; 90 tiles" in text

    assert main(args + ["run.name=quiet", "-q"]) == 0  # -q: nothing but warnings and errors on the terminal
    assert capsys.readouterr() == ("", "")
    assert "90 tiles" in _command_log(tmp_path / "quiet", "tile")  # the file keeps everything

    assert main(args + ["run.name=loud", "-v"]) == 0  # -v: the debug records on the terminal too
    assert "jobs.cli" not in (out := capsys.readouterr().out) and "tile --no-progress" in out.splitlines()[0]
    assert not [h for h in logging.getLogger().handlers if getattr(h, "_lymphoma_handler", False)]  # removed, closed


def test_errors_go_to_stderr_and_into_the_log_file_and_a_refused_command_leaves_nothing(make_dataset, tmp_path,
                                                                                         capsys):
    source = make_dataset(cases_per_class=1, images_per_case=1)
    damaged = tmp_path / "damaged.pt"
    damaged.write_text("not a checkpoint")
    assert main(["export", "--checkpoint", str(damaged), "--out", str(tmp_path / "export")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"lymphoma export: error: checkpoint {damaged} cannot be read")
    assert not (tmp_path / "export").exists()  # refused before it wrote anything: not even a log folder

    args = ["tile", "--no-progress", f"data.source={source}", f"run.root={tmp_path}", "split.val_fraction=0"]
    assert main(args) == 0
    logs = tmp_path / "default" / "logs"
    first = {path: path.read_text() for path in logs.glob("tile-*.log")}
    now = time.time()  # the names this process's next command would take in the coming seconds are taken
    taken = [logs / f"tile-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}-{os.getpid()}.log" for s in range(4)]
    for path in taken:
        path.exists() or path.write_text("an earlier command's log\n")
    assert main(args + ["tiles.compression=foo:9"]) == 2  # an existing run folder keeps the refusal in its log
    assert capsys.readouterr().err.startswith("lymphoma tile: error: tiles.compression 'foo:9'")
    assert all(path.read_text() == first.get(path, "an earlier command's log\n") for path in taken + list(first))
    new = set(logs.glob("tile-*.log")) - set(taken) - set(first)
    assert len(first) == 1 and len(new) == 1  # the refusal has a log of its own, none appended to
    assert "ERROR   jobs.cli: lymphoma tile: error: tiles.compression 'foo:9'" in new.pop().read_text()
