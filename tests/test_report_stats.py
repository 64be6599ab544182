"""The report's statistics on a hand-made sweep (2 groups x 3 seeds, no training): curve bands
(± std and seeded bootstrap CI), Welch's t-test against a baseline, time-to-accuracy, the LaTeX
table, PDF figures, and the refusals of bad options."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import yaml
from scipy import stats

from src.report import (
    Target,
    bootstrap_interval,
    curve_band,
    find_runs,
    group_colours,
    group_runs,
    latex_escape,
    main,
    parse_target,
    plot_client_spread,
    plot_curves,
    time_to_target,
    welch_comparison,
)

ROUNDS = [1, 2, 3, 4]
PERSONAL = {  # val/personal_acc per round, per seed
    "fedavg": [[0.5, 0.6, 0.7, 0.75], [0.4, 0.6, 0.8, 0.82], [0.5, 0.7, 0.85, 0.9]],
    "fed_lora": [
        [0.6, 0.8, 0.9, 0.92],
        [0.55, 0.75, 0.88, 0.91],
        [0.6, 0.7, 0.72, 0.7],
    ],  # best 0.72 before final 0.7
}
BYTES_PER_ROUND = {"fedavg": 1e6, "fed_lora": 2e5}


def write_run(folder, alg, seed, curve, wall_time=10.0):
    (folder / ".hydra").mkdir(parents=True)
    overrides = [f"alg={alg}", f"seed={seed}", "fl.rounds=4"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    lines = ["round,val/global_acc,val/personal_acc,comm/total_bytes"]
    for r, acc in zip(ROUNDS, curve, strict=True):
        lines.append(f"{r},{acc - 0.1},{acc},{BYTES_PER_ROUND[alg] * r}")
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    per_client = [{"personal_acc": curve[-1] - 0.05}, {"personal_acc": curve[-1] + 0.05}]
    summary = {"status": "completed", "wall_time_s": wall_time, "per_client": per_client}
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path):
    folder = tmp_path / "sweep"
    job = 0
    for alg, curves in PERSONAL.items():
        for seed, curve in enumerate(curves):
            write_run(folder / f"{job}_alg={alg},seed={seed}", alg, seed, curve, 10.0 + job)
            job += 1
    return folder


def groups_of(folder):
    runs, broken = find_runs([folder])
    assert not broken
    return group_runs(runs)


def test_band_edges_are_mean_plus_minus_std_of_the_seeds_curves(sweep, tmp_path):
    groups = groups_of(sweep)
    bands = plot_curves(groups, "round", "round", tmp_path / "curves.png")
    for alg, curves in PERSONAL.items():
        band = bands["val/personal_acc", f"alg={alg}"]
        per_round = list(zip(*curves, strict=True))
        mean = [statistics.mean(v) for v in per_round]
        std = [statistics.stdev(v) for v in per_round]
        assert band.x.tolist() == ROUNDS
        np.testing.assert_allclose(band.mean, mean)
        np.testing.assert_allclose(band.low, np.subtract(mean, std))
        np.testing.assert_allclose(band.high, np.add(mean, std))
    mb_band = plot_curves(groups, "comm/total_bytes", "MB", tmp_path / "mb.png")
    np.testing.assert_allclose(mb_band["val/personal_acc", "alg=fedavg"].x, [1, 2, 3, 4])
    np.testing.assert_allclose(mb_band["val/personal_acc", "alg=fed_lora"].x, [0.2, 0.4, 0.6, 0.8])


def test_ci_band_is_the_seeded_bootstrap_interval_of_the_mean_and_reproducible(sweep):
    runs = groups_of(sweep)["alg=fedavg"]
    band = curve_band(runs, "val/personal_acc", ci=True)
    again = curve_band(runs, "val/personal_acc", ci=True)
    np.testing.assert_array_equal(band.low, again.low)
    np.testing.assert_array_equal(band.high, again.high)
    last = np.array([c[-1] for c in PERSONAL["fedavg"]])
    expected = stats.bootstrap(
        (last,), np.mean, n_resamples=2000, rng=np.random.default_rng(0)
    ).confidence_interval
    assert band.low[-1] == pytest.approx(expected.low)
    assert band.high[-1] == pytest.approx(expected.high)
    assert np.all(band.low <= band.mean) and np.all(band.mean <= band.high)


def test_ci_falls_back_to_the_percentile_interval_where_bca_is_undefined(monkeypatch):
    values = np.array([0.2, 0.4, 0.5])
    percentile = stats.bootstrap(
        (values,), np.mean, n_resamples=2000, method="percentile", rng=np.random.default_rng(0)
    ).confidence_interval
    real_bootstrap = stats.bootstrap

    def bca_undefined(*args, method="BCa", **kwargs):
        result = real_bootstrap(*args, method=method, **kwargs)
        if method == "BCa":  # what scipy returns when BCa's bias correction is infinite
            result.confidence_interval = type(result.confidence_interval)(np.nan, np.nan)
        return result

    monkeypatch.setattr(stats, "bootstrap", bca_undefined)
    low, high = bootstrap_interval(values)
    assert (low, high) == (pytest.approx(percentile.low), pytest.approx(percentile.high))
    assert low < values.mean() < high  # a band, not the mean alone


def test_group_colours_come_from_the_sorted_names_whatever_the_order():
    assert group_colours(["b", "a", "c"]) == group_colours(["c", "a", "b"])
    colours = group_colours(["b", "a"])
    assert colours["a"] != colours["b"]


def test_every_figure_is_written_as_pdf_beside_the_png(sweep):
    main([str(sweep), "--ci"])
    for name in ("accuracy_vs_round", "accuracy_vs_mb", "per_client_accuracy"):
        assert (sweep / f"{name}.png").stat().st_size > 0
        pdf = sweep / f"{name}.pdf"
        assert pdf.read_bytes().startswith(b"%PDF")


def welch_ci(a, b, level=0.95):
    """The Welch difference-of-means interval, with the Welch-Satterthwaite df."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf((1 + level) / 2, df) * math.sqrt(va + vb)
    difference = statistics.mean(a) - statistics.mean(b)
    return difference - half, difference + half


def test_welch_p_value_and_ci_match_scipy_and_the_welch_formula():
    a, b = [0.92, 0.91, 0.7], [0.75, 0.82, 0.9]
    comparison = welch_comparison(a, b)
    assert comparison.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    low, high = welch_ci(a, b)
    assert comparison.low == pytest.approx(low)
    assert comparison.high == pytest.approx(high)
    assert comparison.difference == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert comparison.note == ""


def test_few_seeds_get_a_low_power_note_and_one_seed_no_test():
    two = welch_comparison([0.9, 0.8], [0.7, 0.75, 0.72])
    assert "little power" in two.note and not math.isnan(two.p_value)
    one = welch_comparison([0.9], [0.7, 0.75, 0.72])
    assert "no test" in one.note and math.isnan(one.p_value) and math.isnan(one.low)


def test_baseline_table_in_the_report_has_the_welch_p_values(sweep, capsys):
    main([str(sweep), "--baseline", "alg=fedavg"])
    report = (sweep / "report.md").read_text()
    section = report.split("## Against the baseline `alg=fedavg`")[1]
    (row,) = [line for line in section.splitlines() if line.startswith("| `alg=fed_lora` | 3 |")]
    assert "alg=fedavg` |" not in section  # the baseline is not compared with itself
    cells = [c.strip() for c in row.split("|")[1:-1]]
    for pick, (diff_cell, p_cell) in ((lambda c: c[-1], (2, 3)), (max, (4, 5))):
        lora = [pick(c) for c in PERSONAL["fed_lora"]]
        fedavg = [pick(c) for c in PERSONAL["fedavg"]]
        p_value = stats.ttest_ind(lora, fedavg, equal_var=False).pvalue
        assert cells[p_cell] == f"{p_value:.3g}"
        low, high = welch_ci(lora, fedavg)
        difference = statistics.mean(lora) - statistics.mean(fedavg)
        assert cells[diff_cell] == f"{difference:+.3f} [{low:+.3f}, {high:+.3f}]"
    assert cells[2] != cells[4]  # final and best differ (seed 2 of fed_lora peaks early)


def test_time_to_accuracy_gives_the_first_round_and_mb_or_not_reached(sweep):
    groups = groups_of(sweep)
    target = Target("val/personal_acc", 0.8)
    fedavg = [time_to_target(run, target) for run in groups["alg=fedavg"]]
    assert [(r.round, r.megabytes) for r in fedavg[1:]] == [(3, 3.0), (3, 3.0)]
    assert fedavg[0] is None  # 0.75 at best: not reached
    lora = [time_to_target(run, target) for run in groups["alg=fed_lora"]]
    assert (lora[0].round, lora[0].megabytes) == (2, pytest.approx(0.4))
    assert lora[2] is None
    main([str(sweep), "--target", "0.8"])
    report = (sweep / "report.md").read_text()
    (row,) = [line for line in report.splitlines() if line.startswith("| `alg=fedavg` | 2/3")]
    assert "| 3.0 ± 0.0 | 3.000 ± 0.000 |" in row and "not reached" in row


def test_target_on_another_metric_with_key_equals_value(sweep):
    assert parse_target("val/global_acc=0.7", "val/personal_acc") == Target("val/global_acc", 0.7)
    assert parse_target("0.8", "val/personal_acc") == Target("val/personal_acc", 0.8)
    run = groups_of(sweep)["alg=fedavg"][0]
    reached = time_to_target(run, Target("val/global_acc", 0.6))
    assert reached.round == 3  # global = personal - 0.1: 0.6 at round 3
    for r, row in enumerate(run.rows):
        row["val/loss"] = 1.0 - 0.2 * r  # 1.0, 0.8, 0.6, 0.4: lower is better
    assert time_to_target(run, Target("val/loss", 0.6)).round == 3


def test_report_tex_is_a_balanced_booktabs_table_with_the_best_in_bold(sweep):
    main([str(sweep)])
    tex = (sweep / "report.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    rows = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert len(rows) == 3  # header + 2 groups
    assert len({row.count("&") - row.count(r"\&") for row in rows}) == 1
    (lora,) = [row for row in rows if row.startswith(r"alg=fed\_lora")]
    (fedavg,) = [row for row in rows if row.startswith("alg=fedavg")]
    # final personal_acc: fed_lora 0.843 beats fedavg 0.823 -> bold; less MB sent -> bold too
    lora_cells, fedavg_cells = lora.split(" & "), fedavg.split(" & ")
    assert lora_cells[4].startswith(r"$\textbf{0.843} \pm ")
    assert r"\textbf" not in fedavg_cells[4]
    assert r"\textbf{0.800}" in lora_cells[-2]
    assert r"$\pm$" not in tex and r"\pm" in tex


def test_latex_escape_escapes_the_special_characters():
    assert latex_escape("a_b & 5% #1 $x {y}") == r"a\_b \& 5\% \#1 \$x \{y\}"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--baseline", "alg=nope"], "matches no group"),
        (["--baseline", "fl.rounds=4"], "matches 2 groups"),
        (["--target", "fast"], "expected a number"),
        (["--target", "val/personal_acc="], "expected a number"),
        (["--metric", "val/nope", "--baseline", "alg=fedavg"], "no run has this metric"),
    ],
)
def test_bad_options_are_refused_with_one_line_and_exit_code_2(sweep, capsys, option, message):
    with pytest.raises(SystemExit) as exit_:
        main([str(sweep), *option])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (sweep / "report.md").exists()


def test_figures_have_integer_round_ticks_a_log_mb_axis_and_fixed_group_colours(sweep, monkeypatch):
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from src.report import figures as report_figures  # where plot_* look up save_figure

    figures = {}
    monkeypatch.setattr(
        report_figures, "save_figure", lambda figure, png: figures.update({png.stem: figure})
    )
    report_figures.write_plots(groups_of(sweep), sweep)
    colours = group_colours(["alg=fedavg", "alg=fed_lora"])
    for stem in ("accuracy_vs_round", "accuracy_vs_mb"):
        for ax in figures[stem].axes:
            for line in ax.get_lines():
                assert mcolors.to_rgb(line.get_color()) == mcolors.to_rgb(colours[line.get_label()])
            if stem == "accuracy_vs_round":
                locator = ax.xaxis.get_major_locator()
                assert isinstance(locator, MaxNLocator)
                assert all(float(t).is_integer() for t in locator.tick_values(1, 4))
            else:
                assert ax.get_xscale() == "log"
    boxes = [p for p in figures["per_client_accuracy"].axes[0].patches]
    assert [mcolors.to_rgb(b.get_facecolor()) for b in boxes] == [
        mcolors.to_rgb(colours[name]) for name in ("alg=fedavg", "alg=fed_lora")
    ]
    for figure in figures.values():
        plt.close(figure)


def test_groups_are_named_by_the_keys_whose_values_differ(tmp_path):
    """A key given to some runs only, with the same value as the others' default, still
    varies; noise keys (trainer.*, logger.*) and keys with one value never name a group."""
    folder = tmp_path / "mixed"
    for job, (alg, extra) in enumerate(
        [("fedavg", ["logger=csv"]), ("fedavg", ["trainer.enable_progress_bar=false"]),
         ("fed_lora", ["logger=csv"]), ("fed_lora", [])]
    ):  # fmt: skip
        run = folder / f"{job}_run"
        write_run(run, alg, job, PERSONAL[alg][0])
        overrides = [f"alg={alg}", f"seed={job}", "fl.rounds=4", *extra]
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    assert list(groups_of(folder)) == ["alg=fedavg", "alg=fed_lora"]


def test_label_renames_a_group_and_an_unknown_group_is_refused(sweep, capsys):
    main([str(sweep), "--label", "alg=fedavg", "FedAvg", "--label", "alg=fed_lora", "LoRA"])
    report = (sweep / "report.md").read_text()
    assert "| `FedAvg` |" in report and "| `LoRA` |" in report and "alg=fedavg`" not in report
    with pytest.raises(SystemExit) as stopped:
        main([str(sweep), "--label", "alg=nope", "X"])
    assert stopped.value.code == 2
    assert "--label 'alg=nope': no such group" in capsys.readouterr().err


def test_latex_table_fits_a_column_has_a_caption_and_bolds_ties(tmp_path):
    folder = tmp_path / "ties"
    for job, alg in enumerate(["fedavg", "fedavg", "fed_lora", "fed_lora"]):
        write_run(folder / f"{job}_alg={alg},seed={job}", alg, job, [0.5, 0.6, 0.7, 0.8])
    main([str(folder)])
    tex = (folder / "report.tex").read_text()
    assert r"\caption{" in tex and r"\label{tab:fedsweep}" in tex
    assert r"\resizebox{\columnwidth}{!}{%" in tex and tex.count(r"\end{table}") == 1
    rows = [line for line in tex.splitlines() if line.startswith("alg=")]
    # equal final accuracy: both bold; seeds that agree: no "\pm 0.000"
    assert all(row.split(" & ")[4] == r"$\textbf{0.800}$" for row in rows), rows
    assert r"\pm 0.000" not in tex


def test_text_runs_get_loss_and_perplexity_columns(tmp_path):
    folder = tmp_path / "text"
    for job, ppl in enumerate([[9.0, 7.0, 6.0, 6.5], [8.0, 6.0, 5.0, 5.5]]):
        run = folder / f"{job}_alg=fedavg,seed={job}"
        write_run(run, "fedavg", job, [0.5, 0.6, 0.7, 0.8])
        lines = ["round,val/global_acc,val/personal_acc,comm/total_bytes,val/loss,val/ppl"]
        lines += [
            f"{r},0.1,0.2,{1e6 * r},{math.log(p)},{p}" for r, p in zip(ROUNDS, ppl, strict=True)
        ]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    main([str(folder)])
    header = next(
        line
        for line in (folder / "report.md").read_text().splitlines()
        if line.startswith("| group")
    )
    assert "final ppl" in header and "best ppl" in header and "final loss" in header
    row = next(
        line for line in (folder / "report.md").read_text().splitlines() if line.startswith("| `")
    )
    cells = [c.strip() for c in row.split("|")]
    titles = [c.strip() for c in header.split("|")]
    assert cells[titles.index("final ppl")] == "6.00 ± 0.71"  # mean of 6.5 and 5.5
    assert cells[titles.index("best ppl")] == "5.50 ± 0.71"  # the lowest of each run


def test_client_spread_figure_comes_from_clients_csv_and_only_then(sweep, tmp_path):
    groups = groups_of(sweep)
    assert plot_client_spread(groups, tmp_path / "none.png") is False  # no clients.csv
    assert not (tmp_path / "none.png").exists()
    for run in [r for runs in groups.values() for r in runs]:
        lines = ["round,client,sampled,trained,dropped,malicious,train_samples,personal_acc"]
        lines += [f"{r},{c},1,1,,0,10,{0.1 * c + 0.01 * r}" for r in (2, 4) for c in range(5)]
        lines += ["3,0,1,1,,0,10,"]  # a round without evaluation: no accuracy
        (run.folder / "clients.csv").write_text("\n".join(lines) + "\n")
    run = next(iter(groups.values()))[0]
    assert run.client_acc_by_round() == {
        2: pytest.approx([0.02, 0.12, 0.22, 0.32, 0.42]),
        4: pytest.approx([0.04, 0.14, 0.24, 0.34, 0.44]),
    }
    assert plot_client_spread(groups, tmp_path / "spread.png") is True
    assert (tmp_path / "spread.png").is_file() and (tmp_path / "spread.pdf").is_file()
