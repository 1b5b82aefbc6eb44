"""Linear probe (L-BFGS logistic regression + the paper's regularisation search) on constructed features."""

import torch

from pipelines.evaluation.linear_probe import fit_logistic_regression, linear_probe, search_C, split_train_val


def blobs(n_per_class, centres, spread, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + spread * torch.randn(n_per_class, len(c), generator=g) for c in centres])
    y = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return x, y


def test_separates_linearly_separable_features():
    centres = torch.eye(6, 12) * 4
    train_x, train_y = blobs(30, centres, 0.5, seed=0)
    test_x, test_y = blobs(20, centres, 0.5, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, steps_per_decade=2, max_iter=60)
    assert result["accuracy"] == 1.0
    assert result["train_accuracy"] == 1.0
    assert result["n_train"] + result["n_val"] == len(train_y) and result["n_val"] > 0
    assert 1e-6 <= result["C"] <= 1e6


def test_xor_is_not_linearly_separable():
    # The probe is linear: on XOR-labelled points it cannot beat about 50%.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 2, generator=g) * 2 - 1
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    result = linear_probe(x[:300], y[:300], x[300:], y[300:], steps_per_decade=1, max_iter=100)
    assert result["accuracy"] < 0.7


def test_search_prefers_regularisation_on_noisy_high_dimensional_data():
    # Few examples, many noise dimensions, one informative dimension: weak regularisation overfits,
    # so the chosen C is well below the largest on the grid, and it generalises.
    g = torch.Generator().manual_seed(3)
    n, d = 40, 200
    y = torch.arange(2).repeat(n // 2)
    x = torch.randn(n, d, generator=g)
    x[:, 0] += 3.0 * (2 * y - 1)
    vx = torch.randn(200, d, generator=g)
    vy = torch.arange(2).repeat(100)
    vx[:, 0] += 3.0 * (2 * vy - 1)
    search = search_C(x, y, vx, vy, 2, steps_per_decade=2, max_iter=200)
    assert search.best_C < 1e5
    assert len(search.history) >= 7
    model = fit_logistic_regression(x, y, 2, search.best_C, max_iter=200)
    assert (model.predict(vx) == vy).float().mean() > 0.9


def test_stratified_split():
    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    train, val = split_train_val(y, 0.2, seed=0)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(16))
    assert (y[val] == 0).sum() == 2 and (y[val] == 1).sum() == 1 and (y[val] == 2).sum() == 0
