"""The agent's pure reconcile decision: plan(desired, observed, now) -> actions."""

from __future__ import annotations

from strata.agent.plan import (
    Activate,
    CollectGarbage,
    Download,
    ForgetFailures,
    Observed,
    RecordFailure,
    Stage,
    Unload,
    no_variant_key,
    plan,
    retry_at,
)
from strata.agent.state import FailureRecord, ModelSlots, SlotRef
from strata.core.profiles import get_profile
from strata.core.wire import DesiredModel, DesiredState, VariantRef

AVX2 = get_profile("x86_64-avx2")
RUNTIMES = frozenset({"onnxruntime"})


def ref(variant: str, profile: str, n: int) -> VariantRef:
    return VariantRef(
        id=variant,
        profile=profile,
        runtime="onnxruntime",
        precision="fp32",
        digest="sha256:" + f"{n:064x}",
        blob=f"{n + 1000:064x}",
        size=100,
    )


GENERIC_V1 = ref("cpu-generic-fp32", "cpu-generic", 1)
AVX2_V2 = ref("x86_64-avx2-fp32", "x86_64-avx2", 2)
GENERIC_V2 = ref("cpu-generic-fp32", "cpu-generic", 3)
ARM_V2 = ref("arm64-neon-fp32", "arm64-neon", 4)


def desired(*models: DesiredModel) -> DesiredState:
    return DesiredState(node_id="n1", models=models)


def model(version: str, *variants: VariantRef, name: str = "digits") -> DesiredModel:
    return DesiredModel(name=name, version=version, deployment="d1", variants=variants)


def slot_of(variant: VariantRef, version: str, previous: SlotRef | None = None) -> ModelSlots:
    return ModelSlots(active=SlotRef(variant.digest, version, variant.id, 10.0), previous=previous)


def observed(
    slots: dict[str, ModelSlots] | None = None,
    staged: frozenset[str] = frozenset(),
    downloaded: frozenset[str] = frozenset(),
    failures: dict[str, FailureRecord] | None = None,
) -> Observed:
    return Observed(
        profile=AVX2,
        runtimes=RUNTIMES,
        slots=slots or {},
        staged=staged,
        downloaded=downloaded,
        failures=failures or {},
    )


def test_nothing_known_means_nothing_changes() -> None:
    assert plan(None, observed(slots={"digits": slot_of(GENERIC_V1, "1")}), 0.0) == []


def test_fresh_node_downloads_then_stages_then_activates_the_best_variant() -> None:
    want = desired(model("2", GENERIC_V2, AVX2_V2))
    assert plan(want, observed(), 0.0) == [Download("digits", "2", AVX2_V2)]
    assert plan(want, observed(downloaded=frozenset({AVX2_V2.blob})), 0.0) == [Stage("digits", "2", AVX2_V2)]
    assert plan(want, observed(staged=frozenset({AVX2_V2.digest})), 0.0) == [Activate("digits", "2", AVX2_V2)]


def test_converged_node_plans_nothing() -> None:
    want = desired(model("2", GENERIC_V2, AVX2_V2))
    assert plan(want, observed(slots={"digits": slot_of(AVX2_V2, "2")}, staged=frozenset({AVX2_V2.digest})), 0.0) == []


def test_rollback_to_the_previous_slot_needs_no_download() -> None:
    previous = SlotRef(GENERIC_V1.digest, "1", GENERIC_V1.id, 5.0)
    now = observed(
        slots={"digits": slot_of(AVX2_V2, "2", previous)}, staged=frozenset({GENERIC_V1.digest, AVX2_V2.digest})
    )
    assert plan(desired(model("1", GENERIC_V1)), now, 0.0) == [Activate("digits", "1", GENERIC_V1)]


def test_failed_best_variant_falls_back_to_a_compatible_one_until_its_retry() -> None:
    failure = FailureRecord("digits", "2", AVX2_V2.id, "health check failed", at=100.0, attempts=1)
    have = observed(slots={"digits": slot_of(GENERIC_V1, "1")}, failures={AVX2_V2.digest: failure})
    want = desired(model("2", GENERIC_V2, AVX2_V2))
    assert plan(want, have, 101.0) == [Download("digits", "2", GENERIC_V2)]
    assert plan(want, have, retry_at(failure)) == [Download("digits", "2", AVX2_V2)]


def test_failed_only_variant_keeps_the_active_one_serving() -> None:
    failure = FailureRecord("digits", "2", AVX2_V2.id, "health check failed", at=100.0, attempts=3)
    have = observed(slots={"digits": slot_of(GENERIC_V1, "1")}, failures={AVX2_V2.digest: failure})
    assert plan(desired(model("2", AVX2_V2)), have, 150.0) == []
    assert retry_at(failure) == 100.0 + 120.0


def test_retry_backoff_is_capped() -> None:
    failure = FailureRecord("digits", "2", None, "x", at=0.0, attempts=40)
    assert retry_at(failure) == 3600.0


def test_no_variant_for_this_profile_is_recorded_once() -> None:
    want = desired(model("2", ARM_V2))
    actions = plan(want, observed(), 0.0)
    assert len(actions) == 1
    assert isinstance(actions[0], RecordFailure)
    assert "profile x86_64-avx2" in actions[0].reason
    assert "arm64-neon/onnxruntime" in actions[0].reason
    key = no_variant_key("digits", "2")
    recorded = FailureRecord("digits", "2", None, actions[0].reason, 0.0, 1)
    assert plan(want, observed(failures={key: recorded}), 0.0) == []


def test_failures_about_versions_no_longer_desired_are_forgotten() -> None:
    old = FailureRecord("digits", "2", AVX2_V2.id, "bad", at=0.0, attempts=1)
    have = observed(slots={"digits": slot_of(GENERIC_V1, "1")}, failures={AVX2_V2.digest: old})
    assert plan(desired(model("1", GENERIC_V1)), have, 1.0) == [ForgetFailures(frozenset({AVX2_V2.digest}))]


def test_model_no_longer_desired_is_unloaded() -> None:
    have = observed(slots={"digits": slot_of(GENERIC_V1, "1"), "other": slot_of(AVX2_V2, "7")})
    assert plan(desired(model("1", GENERIC_V1)), have, 0.0) == [Unload("other")]


def test_several_models_progress_together() -> None:
    want = desired(model("1", GENERIC_V1), model("2", AVX2_V2, name="embedder"))
    actions = plan(want, observed(staged=frozenset({GENERIC_V1.digest})), 0.0)
    assert actions == [Activate("digits", "1", GENERIC_V1), Download("embedder", "2", AVX2_V2)]


def test_garbage_is_collected_only_once_converged_and_keeps_both_slots() -> None:
    previous = SlotRef(GENERIC_V1.digest, "1", GENERIC_V1.id, 5.0)
    stray = "sha256:" + "f" * 64
    have = observed(
        slots={"digits": slot_of(AVX2_V2, "2", previous)},
        staged=frozenset({GENERIC_V1.digest, AVX2_V2.digest, stray}),
        downloaded=frozenset({"e" * 64}),
    )
    actions = plan(desired(model("2", AVX2_V2)), have, 0.0)
    assert actions == [CollectGarbage(keep=frozenset({GENERIC_V1.digest, AVX2_V2.digest}), keep_blobs=frozenset())]
