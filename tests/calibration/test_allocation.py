"""Mixed precision under a bits budget: the budget is met, the plan is explicit, and bad budgets are refused."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import pytest
import torch

from diffusers_otq import CalibrationConfig, OTQConfig, calibrate, plan_bits, quantize_model
from diffusers_otq.calibration import CandidateTable, LayerStatistics, allocation, estimate, measure_candidates
from diffusers_otq.calibration.allocation import candidate_specs
from diffusers_otq.calibration.fit import corrects_bias, quantize_calibrated
from diffusers_otq.fitting import effective_weight
from diffusers_otq.functional.allocation import stratified_rows
from diffusers_otq.functional.error_feedback import output_error
from diffusers_otq.functional.lowrank import weighted_lowrank
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.options import LayerSpec
from diffusers_otq.structure import LowRankBranch
from tests.calibration.helpers import dit_pipeline, quick


def reached(model: torch.nn.Module) -> float:
    layers = [m for m in model.modules() if isinstance(m, OTQLayerMixin)]
    return sum(m.nbytes for m in layers) * 8 / sum(m.weight_shape.numel() for m in layers)


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread, as the tests run (tests/calibration/conftest.py); module fixtures are set up before it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibrated():
    pipe = dit_pipeline()
    with one_thread():
        return pipe, calibrate(pipe, OTQConfig(bits=3), quick(sensitivity="velocity"))


@pytest.mark.parametrize("budget", [2.0, 3.0, 4.5])
def test_calibrated_budget_is_met_within_a_hundredth(calibrated, budget: float) -> None:
    pipe, stats = calibrated
    plan = plan_bits(pipe.transformer, OTQConfig(bits_per_weight=budget), stats, quick(), progress=False)
    assert plan.sensitivity == "output"
    assert budget - 0.01 <= plan.bits_per_weight <= budget
    model = type(pipe.transformer).from_config(pipe.transformer.config)
    model.load_state_dict(pipe.transformer.state_dict())
    quantize_model(model, OTQConfig(bits_per_weight=budget), statistics=stats, calibration=quick(), progress=False)
    assert abs(reached(model) - plan.bits_per_weight) < 1e-9  # every layer stored as planned (int8 codebooks too)
    dtypes = {m.codebook.dtype for m in model.modules() if isinstance(m, OTQLayerMixin) and m.vector_dim > 1}
    assert budget > 2 or dtypes == {torch.int8}, dtypes  # the 2-bit plan takes int8 vector codebooks
    config = model.config.quantization_config
    assert config.bits_per_weight is None
    assert config.provenance["bits_per_weight"]["budget"] == budget
    assert "calibration" in config.provenance
    # Every allocated layer is pinned by its full name, deeper names first.
    names = list(config.module_overrides)
    assert sorted(names) == sorted(c.name for c in plan.choices)
    assert [n.count(".") for n in names] == sorted((n.count(".") for n in names), reverse=True)


def test_velocity_sensitivity_scales_each_layer(calibrated) -> None:
    pipe, stats = calibrated
    velocity = plan_bits(pipe.transformer, OTQConfig(bits_per_weight=3.0), stats, quick(sensitivity="velocity"),
                         progress=False)  # fmt: skip
    output = plan_bits(pipe.transformer, OTQConfig(bits_per_weight=3.0), stats, quick(), progress=False)
    assert velocity.sensitivity == "velocity" and 2.99 <= velocity.bits_per_weight <= 3.0
    ratios = {c.distortion / c.relative_error for c in velocity.choices if c.relative_error > 0}
    assert len(ratios) > 1  # a factor per layer, unlike the output sensitivity
    assert all(c.distortion == c.relative_error for c in output.choices)


def test_data_free_budget_and_user_overrides(calibrated) -> None:
    pipe, _ = calibrated
    config = OTQConfig(bits_per_weight=3.0, module_overrides={"proj_out_2": {"bits": 8}})
    plan = plan_bits(pipe.transformer, config, progress=False)
    assert plan.sensitivity == "weights"
    pinned = [c for c in plan.choices if c.fixed]
    assert [c.name for c in pinned] == ["proj_out_2"] and pinned[0].spec.bits == 8
    assert 2.99 <= plan.bits_per_weight <= 3.0
    resolved = plan.resolved_config(config)
    assert list(resolved.module_overrides)[0] == "proj_out_2"  # the user's entries stay first
    assert resolved.layer_spec("proj_out_2").bits == 8


def test_more_bits_never_predict_more_distortion(calibrated) -> None:
    pipe, stats = calibrated
    low = plan_bits(pipe.transformer, OTQConfig(bits_per_weight=2.2), stats, quick(), progress=False)
    high = plan_bits(pipe.transformer, OTQConfig(bits_per_weight=3.5), stats, quick(), progress=False)
    assert sum(c.distortion for c in high.choices) <= sum(c.distortion for c in low.choices)


def test_budget_below_the_cheapest_plan_is_refused(calibrated) -> None:
    pipe, stats = calibrated
    with pytest.raises(ValueError, match=r"bits_per_weight=0.5 is below what this model can reach.*at least"):
        plan_bits(pipe.transformer, OTQConfig(bits_per_weight=0.5), stats, quick(), progress=False)
    with pytest.raises(ValueError, match="needs OTQConfig\\(bits_per_weight"):
        plan_bits(pipe.transformer, OTQConfig(bits=3), stats, quick(), progress=False)


def test_one_candidate_table_serves_every_budget_with_the_same_plans_and_codes(calibrated) -> None:
    pipe, stats = calibrated
    table = measure_candidates(pipe.transformer, OTQConfig(bits=3), stats, quick(), progress=False)
    for budget in (2.2, 3.5):
        assert table.allocate(budget) == plan_bits(
            pipe.transformer, OTQConfig(bits_per_weight=budget), stats, quick(), progress=False
        )
    models = []
    for candidates in (None, table):
        model = type(pipe.transformer).from_config(pipe.transformer.config)
        model.load_state_dict(pipe.transformer.state_dict())
        quantize_model(model, OTQConfig(bits_per_weight=2.5), statistics=stats, calibration=quick(),
                       candidates=candidates, progress=False)  # fmt: skip
        models.append(model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_with_noise_bands_the_plan_of_one_set_is_kept_and_every_set_fits_the_budget(calibrated) -> None:
    """The knapsack chooses on one set of codebooks' cost and lowers the budget by the other sets' bytes: the
    plan is a one-set plan at a lower budget, and with every set counted it fits the budget."""
    pipe, stats = calibrated
    banded = measure_candidates(pipe.transformer, OTQConfig(bits=3, noise_band_edges=[500.0]), stats, quick(),
                                progress=False)  # fmt: skip
    one_set = replace(banded, options=tuple(tuple(replace(s, noise_bands=1) for s in row) for row in banded.options))
    one_set = replace(one_set, sizes=tuple(
        tuple(allocation.spec_nbytes(layer.module.weight, s) for s in row)
        for layer, row in zip(one_set.layers, one_set.options, strict=True)))  # fmt: skip
    for budget in (2.0, 3.0):
        plan = banded.allocate(budget)
        assert plan.bits_per_weight <= budget and {c.spec.noise_bands for c in plan.choices} == {2}
        extra = sum(
            allocation._band_bytes(layer, c.spec) for layer, c in zip(banded.layers, plan.choices, strict=True)
        )
        assert plan.bits_per_weight == pytest.approx(one_set_bits(plan, one_set) + extra * 8 / banded.numel)
        # a one-set optimum: the one-set knapsack at the plan's own one-set size picks the same settings
        same = one_set.allocate(one_set_bits(plan, one_set) + 1e-9)
        assert [replace(c.spec, noise_bands=2) for c in same.choices] == [c.spec for c in plan.choices]


def one_set_bits(plan, table: CandidateTable) -> float:
    """Bits per weight of ``plan``'s settings with one set of codebooks each."""
    sizes = {layer.name: dict(zip(row, size, strict=True)) for layer, row, size in
             zip(table.layers, table.options, table.sizes, strict=True)}  # fmt: skip
    return sum(sizes[c.name][replace(c.spec, noise_bands=1)] for c in plan.choices) * 8 / table.numel


def test_a_candidate_table_of_another_model_or_other_statistics_is_refused(calibrated) -> None:
    pipe, stats = calibrated
    data_free = measure_candidates(pipe.transformer, OTQConfig(bits=3), progress=False)
    model = type(pipe.transformer).from_config(pipe.transformer.config)
    with pytest.raises(ValueError, match="measured without statistics, but statistics are given"):
        quantize_model(model, OTQConfig(bits_per_weight=3.0), statistics=stats, candidates=data_free, progress=False)
    other = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with pytest.raises(ValueError, match="measured on another model: its layer .* is missing in Sequential"):
        quantize_model(other, OTQConfig(bits_per_weight=3.0), candidates=data_free, progress=False)


def test_candidates() -> None:
    specs = candidate_specs(LayerSpec(bits=3), 128, 64)
    labels = {(s.bits, s.granularity) for s in specs}
    assert {(b, "channel") for b in range(1, 9)} <= labels
    assert {(b, "group") for b in range(2, 9)} <= labels and (1, "group") not in labels
    assert {(2, "tensor"), (3, "tensor")} <= labels
    assert all(s.granularity != "group" for s in candidate_specs(LayerSpec(bits=3), 72, 64))


def test_vector_candidates_where_their_int8_codebook_is_cheap() -> None:
    specs = [s for s in candidate_specs(LayerSpec(bits=3), 128, 64, 128) if s.vector_dim > 1]
    vectors = {(s.vector_dim, s.bits, s.granularity) for s in specs}
    # 128 x 128 in int8: a 256-entry 4-D codebook (8192 bits) costs 0.5 bit/weight, a 256-entry 8-D one 1.0
    assert vectors == {(2, 1, "tensor"), (2, 2, "tensor"), (2, 3, "tensor"), (4, 1, "tensor"), (4, 2, "tensor"),
                       (8, 1, "tensor"), (2, 2, "group"), (2, 3, "group"), (4, 2, "group")}  # fmt: skip
    assert {s.codebook_dtype for s in specs} == {torch.int8}
    narrow = {(s.vector_dim, s.bits) for s in candidate_specs(LayerSpec(bits=3), 64, 64, 64) if s.vector_dim > 1}
    assert (4, 2) not in narrow and (8, 1) not in narrow and (2, 3) in narrow  # 4096 weights: 8192 bits is 2 b/w
    pinned = candidate_specs(LayerSpec(bits=3, codebook_dtype=torch.float32), 512, 64, 512)
    assert {s.codebook_dtype for s in pinned} == {torch.float32}  # the user's codebook dtype is kept
    assert (4, 2) in {(s.vector_dim, s.bits) for s in pinned}  # 32 Kbit on 256 Kbit of weights
    assert all(s.vector_dim == 1 for s in candidate_specs(LayerSpec(bits=3, method="uniform"), 128, 64, 128))
    assert all(s.vector_dim == 1 for s in candidate_specs(LayerSpec(bits=3), 128, 64))  # no row count: no vectors
    odd = candidate_specs(LayerSpec(bits=2, vector_dim=2), 129, 64, 128)  # the base's vector_dim is not inherited
    assert all(s.vector_dim == 1 for s in odd)


def test_bits_per_weight_is_refused_by_quantize_on_load(tmp_path) -> None:
    from diffusers import DiTTransformer2DModel

    dit_pipeline().transformer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs every weight before the first one is quantized"):
        DiTTransformer2DModel.from_pretrained(tmp_path, quantization_config=OTQConfig(bits_per_weight=2.5))
    with pytest.raises(ValueError, match="bits_per_weight=-1"):
        OTQConfig(bits_per_weight=-1)
    # The low-level converter refuses an unresolved budget too.
    from diffusers_otq.api import quantize_model as convert

    with pytest.raises(ValueError, match="needs every weight"):
        convert(dit_pipeline().transformer, OTQConfig(bits_per_weight=2.5), progress=False)
    assert CalibrationConfig().refit_rounds >= 1


def test_wide_layers_may_spend_bits_on_a_low_rank_branch_and_every_byte_counts(monkeypatch) -> None:
    """Rank candidates exist only where the 16-bit factors are cheap; a layer whose weight is mostly rank 8 then
    takes a branch, and the budget counts the factors."""

    assert {s.rank for s in candidate_specs(LayerSpec(), 1024, 64, rows=1024)} == {0, 16}  # rank 32: 1 b/w
    assert all(s.rank == 0 for s in candidate_specs(LayerSpec(), 512, 64, rows=512))  # rank 16 would cost 1 b/w
    # a small model with the same trade-off: rank-8 factors of a 256 x 256 layer cost 1 bit/weight
    monkeypatch.setattr(allocation, "RANK_CANDIDATES", (8,))
    monkeypatch.setattr(allocation, "MAX_RANK_BITS", 1.0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 32))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(256, 8) @ torch.randn(8, 256) / 8 + 0.01 * torch.randn(256, 256))
    config = OTQConfig(bits_per_weight=3.0)
    plan = plan_bits(model, config, progress=False)
    first = next(c for c in plan.choices if c.name == "0")
    assert first.spec.rank == 8 and "+ rank 8" in plan.table(), plan.table()
    quantize_model(model, config, progress=False)
    assert model[0].rank == 8 and abs(reached(model) - plan.bits_per_weight) < 1e-9 and reached(model) <= 3.0


# --- Cheap candidate measurement: row samples, names, factor_fn, concat ---------------------------------------------

SAMPLED = ("transformer_blocks.0.norm1.linear", "transformer_blocks.0.ff.net.0.proj", "proj_out_1")  # 192/128/64 rows


@pytest.fixture(scope="module")
def tables(calibrated):
    """The tiny DiT's candidates measured exhaustively and from 16-row samples (most layers have 32-192 rows)."""
    pipe, stats = calibrated
    measure = partial(measure_candidates, pipe.transformer, OTQConfig(bits=3), stats, quick(), progress=False)
    with one_thread():
        return measure(estimate="exhaustive"), measure(sample_rows=16)


def output_errors(delta: torch.Tensor, stats, centered: bool) -> torch.Tensor:
    """(R,) ``delta_r H delta_r^T`` of each row (one input group)."""
    return output_error(delta, stats.gram_blocks(0, centered))


def test_stratified_rows_spread_the_sample_over_energy_within_every_group() -> None:
    energy = torch.tensor([7.0, 0.0, 5.0, 2.0, 6.0, 1.0, 4.0, 3.0, 10.0, 17.0, 11.0, 16.0, 12.0, 15.0, 13.0, 14.0])
    rows = stratified_rows(energy, per_group=2, groups=2)
    # 8 rows per group, 2 taken: the rows of energy rank floor(0.5 * 4) = 2 and floor(1.5 * 4) = 6 in each group
    assert rows.tolist() == [3, 4, 11, 12]
    for group, picked in enumerate(rows.reshape(2, 2)):
        ranks = torch.argsort(torch.argsort(energy[group * 8 : group * 8 + 8]))
        assert sorted(ranks[picked - group * 8].tolist()) == [2, 6]
    assert stratified_rows(energy, per_group=8, groups=2) is None  # the whole group: fit the whole layer
    with pytest.raises(ValueError, match="do not split into 3 equal groups"):
        stratified_rows(energy, per_group=2, groups=3)
    with pytest.raises(ValueError, match="per_group=0"):
        stratified_rows(energy, per_group=0)


def test_sampled_estimate_is_the_default_and_keeps_sizes_exact(tables) -> None:
    exhaustive, sampled = tables
    assert (exhaustive.estimate, sampled.estimate) == ("exhaustive", "sampled")
    assert inspect.signature(measure_candidates).parameters["estimate"].default == "sampled"
    assert inspect.signature(plan_bits).parameters["estimate"].default == "sampled"
    assert sampled.sizes == exhaustive.sizes and sampled.options == exhaustive.options
    for layer, estimated, exact in zip(sampled.layers, sampled.errors, exhaustive.errors, strict=True):
        if layer.module.weight.shape[0] <= 16:  # fitted whole: the same fits
            assert estimated == exact, layer.name
    pairs = zip(sum(sampled.errors, ()), sum(exhaustive.errors, ()), strict=True)
    relative = [abs(e / x - 1) for e, x in pairs if x > 0]
    assert sorted(relative)[len(relative) // 2] < 0.15, sorted(relative)


_FLATTERED = pytest.mark.xfail(
    strict=True,
    reason="known (results/two-bit.md, section 3d): int8 vector codebooks of up to 256 codewords, fitted to a 64-row "
    "sample, flatter themselves; this 3.0 b/w plan is 6.3% behind the exhaustive one. Fitting them on the whole layer "
    "fixes it but costs the refined DiT 1.2 dB, because the unrefined ranking undervalues what refinement makes of "
    "large codebooks: to be fixed by a refinement-aware allocation, not by hiding the bias",
)


@pytest.mark.parametrize("budget", [2.0, 2.5, pytest.param(3.0, marks=_FLATTERED)])
def test_sampled_plan_is_within_five_percent_of_the_exhaustive_plan(tables, budget: float) -> None:
    exhaustive, sampled = tables
    best = exhaustive.allocate(budget)
    plan = sampled.allocate(budget)
    assert plan.nbytes <= budget * plan.numel / 8
    chosen = [options.index(c.spec) for options, c in zip(exhaustive.options, plan.choices, strict=True)]
    true_error = sum(errors[i] for errors, i in zip(exhaustive.errors, chosen, strict=True))
    assert true_error <= 1.05 * sum(c.distortion for c in best.choices), (true_error, best.table())


def test_sampled_rows_get_the_codes_the_whole_fit_gives_them(calibrated, tables) -> None:
    """Per-channel codes and the sweep treat rows independently: the estimate of a channel candidate is the whole
    fit's output error on the sampled rows over their reference energy."""
    pipe, stats = calibrated
    _, sampled = tables
    index = [layer.name for layer in sampled.layers].index("transformer_blocks.0.norm1.linear")
    layer = sampled.layers[index]
    weight = layer.module.weight
    layer_stats = stats[layer.name]
    centered = corrects_bias(layer, layer_stats, quick())
    rows = estimate.row_sample(weight, layer_stats, 16, quick().damping, centered)
    assert rows is not None and rows.numel() == 16
    checked = 0
    for spec, estimated in zip(sampled.options[index], sampled.errors[index], strict=True):
        if spec.granularity != "channel" or spec.bits > 4:
            continue
        fit = quantize_calibrated(weight, replace(layer, spec=spec), layer_stats, quick(), refit_codebooks=False)
        target = weight.detach().to(torch.float64)
        delta = target - effective_weight(fit).reshape(target.shape)
        expected = (
            output_errors(delta[rows], layer_stats, centered).sum()
            / output_errors(target[rows], layer_stats, centered).sum()
        )
        assert estimated == pytest.approx(float(expected), rel=1e-4), spec
        checked += 1
    assert checked == 4


def test_names_restrict_the_measurement_to_those_layers(calibrated, tables) -> None:
    pipe, stats = calibrated
    _, sampled = tables
    table = measure_candidates(pipe.transformer, OTQConfig(bits=3), stats, quick(), progress=False, sample_rows=16,
                               names=list(reversed(SAMPLED)))  # fmt: skip
    assert [layer.name for layer in table.layers] == list(SAMPLED)  # model order
    full = {layer.name: errors for layer, errors in zip(sampled.layers, sampled.errors, strict=True)}
    assert list(table.errors) == [full[name] for name in SAMPLED]
    with pytest.raises(ValueError, match=r"names lists \['transformer_blocks.0.nope'\]"):
        measure_candidates(pipe.transformer, OTQConfig(bits=3), stats, names=["transformer_blocks.0.nope"])


def test_factor_fn_replaces_the_velocity_factor_with_the_whole_layer_fit(calibrated, tables) -> None:
    pipe, stats = calibrated
    exhaustive, _ = tables
    calls = {}

    def factor_fn(layer, effective: torch.Tensor, relative_error: float) -> float:
        calls[layer.name] = (effective, relative_error)
        return float(len(layer.name))

    table = measure_candidates(pipe.transformer, OTQConfig(bits=3), stats, quick(sensitivity="velocity"),
                               progress=False, sample_rows=16, names=SAMPLED, factor_fn=factor_fn)  # fmt: skip
    assert table.sensitivity == "custom" and set(calls) == set(SAMPLED)
    exact = {layer.name: (options, errors) for layer, options, errors in
             zip(exhaustive.layers, exhaustive.options, exhaustive.errors, strict=True)}  # fmt: skip
    for j, layer in enumerate(table.layers):
        effective, relative_error = calls[layer.name]
        assert effective.shape == layer.module.weight.shape  # the whole layer, not the sample
        options, sizes, errors, distortions = table.options[j], table.sizes[j], table.errors[j], table.distortions[j]
        probe = min((i for i, s in enumerate(options) if s.bits == 2), key=lambda i: (sizes[i], i))
        whole_options, whole_errors = exact[layer.name]
        assert relative_error == pytest.approx(whole_errors[whole_options.index(options[probe])], rel=1e-9)
        assert distortions == tuple(len(layer.name) * e for e in errors)


def test_concat_joins_per_block_tables_into_the_global_allocation(calibrated, tables) -> None:
    pipe, stats = calibrated
    _, sampled = tables
    names = [layer.name for layer in sampled.layers]
    measure = partial(measure_candidates, pipe.transformer, OTQConfig(bits=3), stats, quick(), progress=False,
                      sample_rows=16)  # fmt: skip
    head, tail = measure(names=names[:2]), measure(names=names[2:5])
    joined = CandidateTable.concat([head, tail])
    assert joined == measure(names=names[:5])  # every per-layer field, in order
    assert joined.allocate(2.5) == measure(names=names[:5]).allocate(2.5)  # one budget over both tables
    mixed = CandidateTable.concat([head, measure(names=names[2:5], estimate="exhaustive")])
    assert mixed.estimate == "mixed" and [layer.name for layer in mixed.layers] == names[:5]
    with pytest.raises(ValueError, match="disjoint layers.*pos_embed.proj"):
        CandidateTable.concat([sampled, measure(names=names[:1])])
    data_free = measure_candidates(pipe.transformer, OTQConfig(bits=3), progress=False, names=names[:1])
    with pytest.raises(ValueError, match=r"one sensitivity, got \['output', 'weights'\]"):
        CandidateTable.concat([measure(names=names[1:2]), data_free])
    with pytest.raises(ValueError, match="at least one table"):
        CandidateTable.concat([])


def test_grouped_conv_rows_are_sampled_within_every_group() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1, groups=2))
    stats = calibrate(model, OTQConfig(bits=3), CalibrationConfig(
        forward_fn=lambda i: model(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(i))),
        num_batches=2, progress=False))  # fmt: skip
    layer_stats = stats["0"]
    assert layer_stats.groups == 2
    weight = model[0].weight
    rows = estimate.row_sample(weight, layer_stats, 16, quick().damping, True)
    assert ((rows < 32).sum(), (rows >= 32).sum()) == (8, 8)  # 8 rows of each group, each reading its own Gram
    exhaustive = measure_candidates(model, OTQConfig(bits=3), stats, progress=False, estimate="exhaustive")
    sampled = measure_candidates(model, OTQConfig(bits=3), stats, progress=False, sample_rows=16)
    assert sampled.sizes == exhaustive.sizes
    layer = exhaustive.layers[0]
    spec = next(s for s in exhaustive.options[0] if s.granularity == "channel" and s.bits == 2)
    fit = quantize_calibrated(
        weight, replace(layer, spec=spec), layer_stats, CalibrationConfig(), refit_codebooks=False
    )
    target = weight.detach().to(torch.float64).reshape(64, -1)
    delta = target - effective_weight(fit).reshape(64, -1)
    grams = [layer_stats.gram_blocks(g, True) for g in range(2)]
    num = sum(output_error(delta[rows[g * 8 : g * 8 + 8]], grams[g]).sum() for g in range(2))
    den = sum(output_error(target[rows[g * 8 : g * 8 + 8]], grams[g]).sum() for g in range(2))
    assert sampled.errors[0][exhaustive.options[0].index(spec)] == pytest.approx(float(num / den), rel=1e-4)
    assert estimate.row_sample(weight, layer_stats, 64, quick().damping, True) is None  # 32 per group: whole


def test_sampled_lowrank_branch_is_the_weighted_svd_of_the_whole_weight() -> None:
    """The range sketch finds the same rank-8 branch as the SVD of the whole (weighted) weight."""
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(256, 256, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(96, 96, generator=generator, dtype=torch.float64))
    weight = (left[:, :96] * 0.7 ** torch.arange(96, dtype=torch.float64)) @ right  # decaying spectrum
    inputs = torch.randn(512, 96, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 2, 96)
    gram = [inputs.T @ inputs / 512]
    stats = LayerStatistics(inputs.sum(0)[None], inputs.square().sum(0)[None], torch.tensor(512.0),
                            (gram[0][None] * 512,), inputs.sum(0)[None], torch.tensor(512.0))  # fmt: skip
    sketched = estimate.lowrank_product(weight, 8, stats, 0.01, False)
    up, down = weighted_lowrank(weight, 8, gram, damping=0.01)
    exact = LowRankBranch.from_factors(up, down, torch.float16).product(torch.float64)
    assert estimate.range_basis(weight, 18, gram, None, 0.01).shape == (256, 18)
    assert float((sketched - exact).norm() / exact.norm()) < 1e-3


def test_bad_estimates_are_refused(calibrated) -> None:
    pipe, stats = calibrated
    with pytest.raises(ValueError, match=r"estimate='rows' is unknown; expected one of \['sampled', 'exhaustive'\]"):
        measure_candidates(pipe.transformer, OTQConfig(bits=3), stats, estimate="rows")
    with pytest.raises(ValueError, match="sample_rows=0 must be a positive int"):
        plan_bits(pipe.transformer, OTQConfig(bits_per_weight=3.0), stats, sample_rows=0)
