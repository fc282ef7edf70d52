"""Worker command lines and the parsing of its JSON-lines output, with real child processes."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from SALTSegmentLib.host import worker_driver as wp
from SALTSegmentLib.host.worker_protocol import EXIT_INTERRUPTED

MODULE_DIR = str(Path(wp.__file__).resolve().parents[1])


def test_train_command():
    settings = wp.TrainCommand(image="img.nrrd", labels="labels.seg.nrrd", out="a.safetensors",
                                model="lite_medsam", segments=["liver", "spleen"], slices=[12, 30, 41],
                                axis="coronal", steps=2, device="cpu")
    command = wp.worker_command(settings, python="/py")
    assert command[:3] == ["/py", "-m", "SALTSegmentLib.cli"]
    assert command[3:] == ["train", "--image", "img.nrrd", "--labels", "labels.seg.nrrd", "--out", "a.safetensors",
                           "--method", "salt", "--model", "lite_medsam", "--segments", "liver,spleen",
                           "--slices", "12,30,41", "--axis", "coronal", "--steps", "2",
                           "--device", "cpu", "--progress", "json"]


def test_train_command_leaves_defaults_to_the_cli():
    args = wp.TrainCommand(image="i", labels="l", out="o", weights="/w/sam.pth", rank="large",
                            stop_file="/run/stop").arguments()
    assert "--model" not in args and "--steps" not in args and "--slices" not in args
    assert args[args.index("--weights") + 1] == "/w/sam.pth"
    assert args[args.index("--rank") + 1] == "large"
    assert args[args.index("--stop-file") + 1] == "/run/stop"


def test_a_continued_training_leaves_the_parents_choices_to_the_cli():
    """The CLI refuses a method, model or plane that differs from the parent's: the panel's are not sent."""
    args = wp.TrainCommand(image="i", labels="l", out="o", init="/lib/site.safetensors", method="lora",
                           model="sam_vit_b", axis="coronal", rank="large", steps=5).arguments()
    assert args[args.index("--init") + 1] == "/lib/site.safetensors"
    assert not {"--method", "--model", "--axis", "--rank"} & set(args)
    assert args[args.index("--steps") + 1] == "5"


@pytest.mark.parametrize("change", [{"method": "dora"}, {"device": "tpu"}, {"axis": "oblique"},
                                    {"segments": ["a,b"]}, {"rank": "paper"}])
def test_train_settings_are_checked(change):
    settings = wp.TrainCommand(image="i", labels="l", out="o", **change)
    with pytest.raises(ValueError):
        settings.arguments()


def test_propagate_command():
    args = wp.PropagateCommand(image="i.nrrd", adapter="a.safetensors", out="o.seg.nrrd", labels="l.seg.nrrd",
                                mode="box", first=3, last=17, device="cuda").arguments()
    assert args == ["propagate", "--image", "i.nrrd", "--adapter", "a.safetensors", "--out", "o.seg.nrrd",
                    "--labels", "l.seg.nrrd", "--mode", "box", "--range=3:17", "--device", "cuda",
                    "--progress", "json"]
    plain = wp.PropagateCommand(image="i", adapter="a", out="o").arguments()
    assert "--labels" not in plain and not any(a.startswith("--range") for a in plain)


def test_slices_the_user_emptied_go_to_both_commands_as_absent():
    """``--absent NAME=S1,S2`` per segment with slices, sorted, in the mapping's order; nothing when there are none."""
    absent = {"Thalamus_L": [53, 52], "Caudate_R": [18], "Putamen=left": [7], "untouched": []}
    expected = ["--absent", "Thalamus_L=52,53", "--absent", "Caudate_R=18", "--absent", "Putamen=left=7"]
    train = wp.TrainCommand(image="i", labels="l", out="o", absent=absent).arguments()
    propagate = wp.PropagateCommand(image="i", adapter="a", out="o", labels="l", absent=absent).arguments()
    for args in (train, propagate):
        assert [a for i, a in enumerate(args) if "--absent" in (a, args[i - 1])] == expected
        assert args.count("--absent") == 3
    assert propagate[propagate.index("--labels"):propagate.index("--mode")] == ["--labels", "l"] + expected
    # a name argparse would take for an option is attached to the option
    assert wp.PropagateCommand(image="i", adapter="a", out="o", absent={"-x": [3]}).arguments().count(
        "--absent=-x=3") == 1
    for args in (wp.TrainCommand(image="i", labels="l", out="o").arguments(),
                 wp.PropagateCommand(image="i", adapter="a", out="o", absent={"empty": ()}).arguments()):
        assert not any(a.startswith("--absent") for a in args)
    with pytest.raises(ValueError):
        wp.TrainCommand(image="i", labels="l", out="o", absent={"liver": [-1]}).arguments()


@pytest.mark.parametrize("first,last", [(5, None), (9, 3), (-1, 4)])
def test_propagate_rejects_bad_ranges(first, last):
    with pytest.raises(ValueError):
        wp.PropagateCommand(image="i", adapter="a", out="o", first=first, last=last).arguments()


def test_evaluate_and_models_commands():
    assert wp.EvaluateCommand(pred="p", ref="r").arguments() == ["evaluate", "--pred", "p", "--ref", "r", "--json"]
    assert wp.ModelsCommand().arguments() == ["models", "--json"]
    assert wp.ModelsCommand(download="sam_vit_b").arguments() == ["models", "--download", "sam_vit_b",
                                                                   "--progress", "json"]


def test_environment_puts_the_module_folder_first():
    env = wp.worker_environment("/mod", {"PYTHONPATH": "/a" + os.pathsep + "/mod", "HOME": "/h"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/mod", "/a"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["HOME"] == "/h"


@pytest.mark.parametrize("seconds,text", [(None, ""), (4.4, "4 s"), (185, "3 min 05 s"), (3720, "1 h 02 min")])
def test_format_duration(seconds, text):
    assert wp.format_duration(seconds) == text


STREAM = [
    '{"event": "start", "command": "train", "total": 4, "device": "cpu"}',
    "Loading lite_medsam ...",
    '{"event": "progress", "phase": "train", "step": 1, "total": 4, "loss": 0.9, "eta_s": 185.0}',
    '{"event": "progress", "phase": "train", "step": 2, "total": 4, "loss": 0.7, "eta_s": 61.0}',
    '{"event": "checkpoint", "path": "/tmp/a.safetensors", "step": 2}',
    '{"event": "message", "text": "segment nodule is small"}',
    '{"event": "result", "outputs": {"adapter": "/tmp/a.safetensors"}, "summary": {"final_loss": 0.5}}',
]


def test_monitor_parses_a_stream_split_in_arbitrary_chunks():
    text = "\n".join(STREAM) + "\n"
    monitor = wp.WorkerMonitor()
    events = []
    for start in range(0, len(text), 37):     # QProcess delivers whatever has arrived
        events += monitor.feed(text[start:start + 37])
        if monitor.step == 2 and not monitor.finished:
            assert monitor.fraction == 0.5
            assert monitor.progress_text() == "Training: step 2/4 - loss 0.700 - about 1 min 01 s left"
    assert [e["event"] for e in events] == ["start", "progress", "progress", "checkpoint", "message", "result"]
    assert monitor.losses == [(1, 0.9), (2, 0.7)]
    assert monitor.checkpoints == ["/tmp/a.safetensors"]
    assert monitor.messages == ["segment nodule is small"]
    assert monitor.log == ["Loading lite_medsam ..."]
    outcome = monitor.outcome(0)
    assert (outcome.status, outcome.outputs, outcome.summary) == ("ok", {"adapter": "/tmp/a.safetensors"},
                                                                 {"final_loss": 0.5})


def test_monitor_reports_errors_and_crashes():
    monitor = wp.WorkerMonitor()
    monitor.feed('{"event": "error", "message": "No labelled slices", "hint": "draw a few slices"}\n')
    assert monitor.progress_text() == "Error: No labelled slices"
    outcome = monitor.outcome(1)
    assert outcome.status == "error" and outcome.message == "No labelled slices (draw a few slices)"

    crashed = wp.WorkerMonitor()
    crashed.feed("Traceback (most recent call last):\nMemoryError")   # no newline at the end
    outcome = crashed.outcome(1)
    assert outcome.status == "error" and outcome.message.endswith("MemoryError")


def test_monitor_keeps_the_last_adapter_when_cancelled():
    monitor = wp.WorkerMonitor()
    monitor.feed('{"event": "checkpoint", "path": "/x/a.safetensors", "step": 7}\n')
    outcome = monitor.outcome(EXIT_INTERRUPTED)
    assert outcome.status == "cancelled" and outcome.message.endswith("/x/a.safetensors")


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_real_child_process_stream():
    command = _child("""
        import sys
        from SALTSegmentLib.host.worker_protocol import emit
        emit("start", command="propagate", total=3, device="cpu")
        print("a plain log line", flush=True)
        for i in range(1, 4):
            emit("progress", phase="propagate", step=i, total=3, elapsed_s=0.1 * i, eta_s=0.1 * (3 - i))
        print("warning on stderr", file=sys.stderr, flush=True)
        emit("result", outputs={"segmentation": "/tmp/out.seg.nrrd"}, summary={"slices": 3})
    """)
    seen = []
    worker = wp.SubprocessWorker(command, env=wp.worker_environment(MODULE_DIR),
                                 on_event=lambda w, e: seen.append(w.monitor.progress_text()))
    outcome = worker.run(timeout=60)
    assert outcome.status == "ok" and outcome.outputs == {"segmentation": "/tmp/out.seg.nrrd"}
    assert seen[1] == "Propagate: slice 1/3 - about 0 s left"
    assert worker.monitor.fraction == 1.0 and worker.monitor.losses == []
    assert "warning on stderr" in worker.monitor.log and "a plain log line" in worker.monitor.log


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is POSIX")
def test_sigterm_stops_a_child_that_saves_and_exits_3(tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    command = _child(f"""
        import signal, sys, time
        from SALTSegmentLib.host.worker_protocol import emit
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        emit("start", command="train", total=1000, device="cpu")
        for step in range(1, 1001):
            if stop:
                open({str(adapter)!r}, "w").write("saved")
                emit("checkpoint", path={str(adapter)!r}, step=step - 1)
                emit("error", message="Interrupted", hint="the last adapter was saved")
                sys.exit(3)
            time.sleep(0.02)
            emit("progress", phase="train", step=step, total=1000, loss=1.0 / step)
    """)

    def cancel_after_two_steps(worker, event):
        if event["event"] == "progress" and event["step"] == 2:
            worker.terminate()

    worker = wp.SubprocessWorker(command, env=wp.worker_environment(MODULE_DIR), on_event=cancel_after_two_steps)
    outcome = worker.run(timeout=60)
    assert outcome.exit_code == EXIT_INTERRUPTED and outcome.status == "cancelled"
    assert outcome.message.endswith(str(adapter))
    assert adapter.read_text() == "saved"
    assert 2 <= worker.monitor.step < 1000


def test_monitor_keeps_json_documents_and_reports_downloads():
    monitor = wp.WorkerMonitor()
    monitor.feed('{"dice": {"liver": 0.9}}\n[{"id": "lite_medsam", "available": true}]\n')
    assert monitor.document == [{"id": "lite_medsam", "available": True}] and monitor.log == []
    assert monitor.outcome(0).document == monitor.document
    download = wp.WorkerMonitor()
    download.feed('{"event": "start", "command": "download", "total": 0, "pid": 4242}\n'
                  '{"event": "progress", "phase": "download", "step": 125000000, "total": 375000000}\n')
    assert download.pid == 4242
    assert download.progress_text() == "Downloading: 125 of 375 MB"
    assert abs(download.fraction - 1 / 3) < 1e-9


@pytest.mark.parametrize("text,expected", [("", "fallback"), ("\n  \n", "fallback"), (None, "fallback"),
                                           ("first\nlast line\n\n", "last line")])
def test_last_line_never_fails_on_empty_output(text, expected):
    assert wp.last_line(text, "fallback") == expected


def test_cancel_plan_waits_for_a_step_then_gives_up(tmp_path):
    stop_file = tmp_path / "stop"
    plan = wp.CancelPlan(str(stop_file))
    monitor = wp.WorkerMonitor()
    assert plan.request(monitor) == 3 * wp.CancelPlan.MIN_GRACE_S   # no step timed yet: the model may be loading
    assert stop_file.read_text() == "stop\n" and plan.requested
    monitor.feed('{"event": "progress", "phase": "train", "step": 4, "total": 40, "elapsed_s": 20.0}\n')
    assert wp.CancelPlan.grace_seconds(monitor) == 8 * 5.0 + 10
    monitor.feed('{"event": "progress", "phase": "train", "step": 5, "total": 40, "elapsed_s": 1000.0}\n')
    assert wp.CancelPlan.grace_seconds(monitor) == wp.CancelPlan.MAX_GRACE_S
    assert wp.CancelPlan(None).request(monitor) == 0.0             # nothing to save: end it at once


def test_a_killed_worker_reads_as_cancelled():
    monitor = wp.WorkerMonitor()
    monitor.feed('{"event": "progress", "phase": "propagate", "step": 3, "total": 62}\n')
    assert monitor.outcome(-9, cancelled=True).status == "cancelled"
    assert monitor.outcome(-9).status == "error"


def test_download_progress_is_reported_as_protocol_events(monkeypatch, capsys):
    """``models --download ID --progress json``: start (with pid), throttled progress, result; no tqdm bar."""
    import SALTSegmentLib.models as models
    from SALTSegmentLib import cli

    total = 400 * (1 << 20)

    def fake_download(model_id, progress=None):
        for done in range(1 << 20, total + 1, 1 << 20):   # 400 chunks of 1 MiB, as the real download calls it
            progress(done, total)
        return f"/cache/{model_id}.pth"

    monkeypatch.setattr(models, "download_weights", fake_download)
    assert cli.main(["models", "--download", "sam_vit_b", "--progress", "json"]) == 0
    monitor = wp.WorkerMonitor()
    events = monitor.feed(capsys.readouterr().out)
    assert events[0]["event"] == "start" and events[0]["pid"] == os.getpid()
    progress = [e for e in events if e["event"] == "progress"]
    assert 1 <= len(progress) <= 101 and progress[-1]["step"] == total
    outcome = monitor.outcome(0)
    assert outcome.status == "ok" and outcome.outputs == {"weights": "/cache/sam_vit_b.pth"}
