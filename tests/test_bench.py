"""transeg.bench: the latency spread (median, quartiles), the warning when it is noisy, the ISR sweep's rows."""
from helpers import run
from transeg import bench


def _fake_timings(monkeypatch, ms):
    monkeypatch.setattr(bench, "time_forward", lambda *a, **k: [m / 1e3 for m in ms])


def test_bench_prints_spread_and_warns_when_noisy(work, capsys, monkeypatch):
    """Timings 10, 10, 11, 20, 30 ms: median 11, quartiles 10 and 20 (inclusive), so the IQR is 91 % of
    the median, above the 10 % threshold: a warning. 10.0, 10.0, 10.1, 10.1, 10.2: IQR 1 %: none."""
    _fake_timings(monkeypatch, [10, 30, 11, 20, 10])
    assert run(["bench", "runs/train/model.safetensors", "--size", "64x64", "--runs", "5"], work) == 0
    out, err = capsys.readouterr()
    assert "latency median 11.0 ms (IQR 10.0-20.0 ms, min 10.0, max 30.0)" in out
    assert "transeg: warning: latencies are noisy: the middle half of the runs spans 91% of the median" in err
    _fake_timings(monkeypatch, [10.0, 10.1, 10.2, 10.1, 10.0])
    assert run(["bench", "runs/train/model.safetensors", "--size", "64x64", "--runs", "5"], work) == 0
    out, err = capsys.readouterr()
    assert "latency median 10.1 ms (IQR 10.0-10.1 ms" in out and "warning" not in err


def test_isr_sweep_rows_show_spread_and_mark_the_papers_setting(work, capsys, monkeypatch, tmp_path):
    """SegFormer's encoder-only sweep: 8 settings; every row has its IQR; the row for the paper's 2,2,1,1
    is flagged for the chart; 3 fake runs of 10, 14, 18 ms: quartiles 12 and 16, 29 % of the median: a warning."""
    _fake_timings(monkeypatch, [10, 14, 18])
    rows = []
    real = bench.measure
    monkeypatch.setattr(bench, "measure", lambda *a, **k: rows.extend(real(*a, **k)) or rows)
    assert run(["bench", "runs/train/model.safetensors", "--size", "256x256", "--runs", "3", "--isr-sweep",
                "--plot", str(tmp_path / "sweep.png")], work) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if "GFLOPs" in line]
    assert len(lines) == 8 and all("IQR 12.0-16.0" in line for line in lines)
    assert [r["label"] for r in rows if r["paper"]] == ["2,2,1,1"]
    assert "spans 29% of the median" in err and (tmp_path / "sweep.png").is_file()



def test_bench_and_models_show_a_progress_bar_on_a_terminal(work, capsys, monkeypatch):
    """`transeg bench` (41 s for EoMT) and `transeg models` (20 s) print nothing until done: on a terminal a
    bar on stderr counts the warm-up and timed runs / the variants; with stderr a file or a pipe, none."""
    import re
    import sys

    for tty in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        assert run(["bench", "runs/train/model.safetensors", "--size", "64x64", "--runs", "3", "--warmup", "2"],
                   work) == 0
        out, err = capsys.readouterr()
        assert bool(re.search(r"timing runs: .*\| \d/5 ", err)) == tty, err  # 2 warm-up + 3 timed
        assert "latency median" in out and "timing runs" not in out
        assert run(["models", "--family", "segformer", "--no-flops"], work) == 0
        out, err = capsys.readouterr()
        assert bool(re.search(r"measuring on the meta device: .*\| \d/6 ", err)) == tty, err  # B0-B5
        assert out.startswith("model ")


def test_the_progress_ticks_once_per_run():
    """time_forward calls its tick after every run, warm-up included."""
    import torch

    ticks = []
    bench.time_forward(torch.nn.Conv2d(3, 2, 1), (8, 8), warmup=2, runs=3, tick=lambda: ticks.append(1))
    assert len(ticks) == 5


def test_bench_builds_a_variant_with_its_datasets_classes(monkeypatch, capsys):
    """`transeg bench eomt-dinov2-l16-cityscapes` times the Cityscapes model, 19 classes (it built a 150-class
    head); a variant of no one dataset gets ADE20K's 150; --num-classes wins."""
    from transeg import registry
    from transeg.cli import main
    from transeg.errors import TransegError

    built = []

    def create_model(name, num_classes=150, **kwargs):
        built.append((name, num_classes))
        raise TransegError("built")  # (nothing to time)

    monkeypatch.setattr(registry, "create_model", create_model)
    for argv in (["eomt-dinov2-l16-cityscapes"], ["segformer-b0"], ["segformer-b0", "--num-classes", "19"]):
        assert main(["bench", *argv]) == 2
    assert built == [("eomt-dinov2-l16-cityscapes", 19), ("segformer-b0", 150), ("segformer-b0", 19)]
    capsys.readouterr()
