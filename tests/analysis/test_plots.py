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
