"""The report's figures say what they show: loss terms as they enter the loss (unweighted, and said so), ce's
total not drawn twice, a readable t-SNE grid (square panels, visible points, one legend), and training curves
that join the evaluated epochs of a run with train.eval_every."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ipasdctl.analysis import plots


@pytest.fixture
def figures(monkeypatch) -> list:
    """The matplotlib figures the plot functions make, instead of their PNG files."""
    made = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: made.append(figure) or path)
    return made


def metrics(epochs: int, **columns) -> pd.DataFrame:
    return pd.DataFrame({"epoch": np.arange(1, epochs + 1), **{k: np.asarray(v, float) for k, v in columns.items()}})


def test_a_term_equal_to_the_total_is_drawn_once_and_terms_say_they_are_unweighted():
    ce = [metrics(3, train_loss=[2.0, 1.5, 1.2], loss_ce=[2.0, 1.5, 1.2])]
    assert list(plots.loss_curves(ce)) == ["train_loss (total = loss_ce)"]
    # IPASD: loss = loss_soft + w_con * loss_con (w_con 0.01): the term is logged before its weight
    ipasd = [metrics(3, train_loss=[2.0, 1.52, 1.31], loss_soft=[2.0, 1.5, 1.29], loss_con=[0.0, 2.0, 2.1]),
             metrics(3, train_loss=[2.2, 1.62, 1.41], loss_soft=[2.2, 1.6, 1.39], loss_con=[0.0, 2.2, 2.3])]
    curves = plots.loss_curves(ipasd)
    assert list(curves) == ["train_loss (total)", "loss_soft (unweighted)", "loss_con (unweighted)"]
    assert curves["loss_con (unweighted)"].tolist() == pytest.approx([0.0, 2.1, 2.2])  # the mean over seeds


def test_the_loss_terms_figure_carries_those_labels(tmp_path, figures):
    ce = [metrics(2, train_loss=[2.0, 1.5], loss_ce=[2.0, 1.5])]
    ipasd = [metrics(2, train_loss=[2.0, 1.52], loss_soft=[2.0, 1.5], loss_con=[0.0, 2.0])]
    plots.plot_loss_terms({"ce": ce, "ipasd": ipasd}, tmp_path / "terms.png", "digits")
    (figure,) = figures
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figure.axes if ax.get_legend()]
    assert legends == [["train_loss (total = loss_ce)"], ["train_loss (total)", "loss_soft (unweighted)",
                                                         "loss_con (unweighted)"]]
    assert "unweighted" in figure.get_suptitle()


def test_the_report_tsne_is_a_grid_of_square_panels_with_visible_points_and_one_legend(tmp_path, figures):
    rng = np.random.default_rng(0)
    per_method = {m: (rng.normal(size=(2000, 2)), np.arange(2000) % 10, 0) for m in ("ce", "ipasd", "ls", "byot")}
    plots.plot_eval_tsne(per_method, [f"c{i}" for i in range(10)], tmp_path / "tsne.png", "digits")
    (figure,) = figures
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title().split()[0] for ax in panels] == list(per_method)
    assert all(ax.get_box_aspect() == 1 for ax in panels)
    assert {ax.get_subplotspec().colspan.start for ax in panels} == {0, 1, 2}  # three to a row: 2 rows of 4 panels
    width, height = figure.get_size_inches()
    assert width < 15 and height < 10  # readable where a report shows it, not a 4-panel-wide strip
    sizes = np.concatenate([c.get_sizes() for ax in panels for c in ax.collections])
    assert sizes.min() >= 8.0  # 2000 points would get 3 pt^2 markers otherwise
    assert len(figure.legends) == 1 and not any(ax.get_legend() for ax in panels)


def test_training_curves_join_the_evaluated_epochs_of_a_run_with_eval_every(tmp_path, figures):
    frame = metrics(5, test_top1=[np.nan, 40.0, np.nan, 60.0, 62.0])
    plots.plot_training_curves({"ce": [frame]}, tmp_path / "curves.png", "digits")
    (figure,) = figures
    (line,) = figure.axes[0].get_lines()
    assert line.get_xdata().tolist() == [2, 4, 5] and line.get_ydata().tolist() == [40.0, 60.0, 62.0]


def test_the_pareto_plot_has_a_panel_per_batch_size_rings_the_front_and_leaves_out_unmeasured_rows(tmp_path, figures):
    from ipasdctl.analysis.selection import pareto_mask

    def rows(latency):
        table = pd.DataFrame({"label": ["a", "a", "b", "c"], "precision": ["fp32", "int8", "fp32", "fp32"],
                              "top1": [90.0, 89.0, 80.0, 85.0], "latency_ms": latency})
        return table.assign(pareto_optimal=pareto_mask(table["top1"], table["latency_ms"]))

    panels = {1: rows([2.0, 1.0, 0.5, np.nan]), 64: rows([40.0, 50.0, 10.0, 30.0])}
    plots.plot_pareto(panels, tmp_path / "pareto.png", "cifar10")
    (figure,) = figures
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["batch 1", "batch 64"]
    for ax, table in zip(axes, panels.values()):
        measured = table[table["latency_ms"].notna()]
        points = np.array([c.get_offsets()[0] for c in ax.collections])
        assert sorted(map(tuple, points)) == sorted(zip(measured["latency_ms"], measured["top1"]))
        ringed = {tuple(c.get_offsets()[0]) for c in ax.collections if c.get_linewidths()[0] > 0
                  and c.get_edgecolors().size and c.get_edgecolors()[0][3] > 0}
        assert ringed == set(zip(*[measured.loc[measured["pareto_optimal"], k] for k in ("latency_ms", "top1")]))
        (front,) = ax.get_lines()  # the step line through the front, fastest first
        assert list(front.get_xdata()) == sorted(measured.loc[measured["pareto_optimal"], "latency_ms"])
        assert ax.get_xscale() == "log"
    # batch 1: b (0.5 ms) < a int8 (1 ms) < a fp32 (2 ms), each more accurate: all three on the front, c unmeasured
    assert panels[1]["pareto_optimal"].tolist() == [True, True, True, False]
    # batch 64: a int8 (50 ms, 89 %) is beaten by a fp32 (40 ms, 90 %)
    assert panels[64]["pareto_optimal"].tolist() == [True, False, True, True]
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[:3] == ["a", "b", "c"] and {"fp32", "int8"} <= set(legend) and "fp16" not in legend
    assert sorted(t.get_text() for t in axes[1].texts) == ["a (fp32)", "b (fp32)", "c (fp32)"]  # the front, named


def test_many_models_are_coloured_by_group_and_only_the_front_is_named(tmp_path, figures):
    from ipasdctl.analysis.selection import pareto_mask

    n = plots.PARETO_COLOURS + 2
    table = pd.DataFrame({"label": [f"m{i}" for i in range(n)], "group": ["big" if i % 2 else "small" for i in range(n)],
                          "precision": "fp32", "top1": np.arange(n, dtype=float), "latency_ms": 1.0 + np.arange(n) % 3})
    table["pareto_optimal"] = pareto_mask(table["top1"], table["latency_ms"])
    plots.plot_pareto({1: table}, tmp_path / "pareto.png", "many")
    (figure,) = figures
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[:2] == ["big", "small"] and not any(t.startswith("m") for t in legend)
    named = sorted(t.get_text() for t in figure.axes[0].texts)
    assert named == sorted(f"{label} (fp32)" for label in table.loc[table["pareto_optimal"], "label"])
