"""medaug.job: a job's stages in order, skipping what is complete."""

import json

from medaug.atomic import atomic_folder
from medaug.job import JobStage, Record, job_summary, run_stages, stage_key


def _writer(root, calls, name):
    def run():
        calls.append(name)
        with atomic_folder(root / name) as out:
            (out / "x").write_text(name)
        return {"n": len(calls)}

    return run


def test_run_stages_skips_recorded_stages_and_reruns_after_an_input_changes(tmp_path):
    calls, printed = [], []
    record_file = tmp_path / "run.json"

    def stages(setting):
        a, b = tmp_path / "a", tmp_path / "b"
        return [
            JobStage("a", _writer(tmp_path, calls, "a"), a),  # no key: always runs (reuse by its own stamp)
            JobStage(
                "b",
                _writer(tmp_path, calls, "b"),
                b,
                key=lambda: stage_key({"s": setting}, {"a": a}, b),
                summary=printed.append,
            ),
        ]

    first = run_stages(stages(1), Record(record_file))
    assert first["ran"] == ["a", "b"] and calls == ["a", "b"] and printed == []
    assert json.loads(record_file.read_text())["b"]["result"] == {"n": 2}
    again = run_stages(stages(1)[1:], Record(record_file))  # b's input unchanged: skipped, its summary printed
    assert again == {"ran": [], "skipped": ["b"], "results": {"b": {"n": 2}}} and printed == [{"n": 2}]
    assert run_stages(stages(2)[1:], Record(record_file))["ran"] == ["b"]  # a new setting
    run_stages(stages(2), Record(record_file))  # a rewritten: b runs again
    assert calls == ["a", "b", "b", "a", "b"]


def test_job_summary_names_the_dataset_bundle_and_run(tmp_path):
    text = job_summary(
        {"export_dir": str(tmp_path), "samples": 6, "archive": f"{tmp_path}.tar.gz", "mlflow_run_id": "r1"},
        "demo",
        "sqlite:///m.db",
    )
    assert f"Synthetic dataset : {tmp_path}  (6 images)" in text and f"{tmp_path}.tar.gz.sha256" in text
    assert "MLflow run        : r1 in experiment 'demo' at sqlite:///m.db" in text
    assert "MLflow" not in job_summary({"export_dir": str(tmp_path), "samples": 0}, "demo", "u")
