"""`service.jobs.rna_channel`: how a request's RNA profile reaches its job and when it goes away, on the real
job store (SQLite) and file blob store, and how `submit_analysis` keys reuse on it."""

from __future__ import annotations

import math
import os
import time

import pytest

from service.config import Settings
from service.inference.rna_input import canonical_bytes, profile_from_lists, read_profile
from service.jobs import lifecycle, rna_channel
from service.jobs.embedded import EmbeddedRunner
from service.jobs.resources import open_store
from service.jobs.submit import submit_analysis
from service.store import repo
from service.store.db import transaction
from service.store.models import Job


@pytest.fixture
def env(tmp_path):
    settings = Settings(data_dir=tmp_path)
    store = open_store(settings)
    with transaction(store.sessions) as s:
        tenant = repo.ensure_tenant(s, "lab")
        slide = repo.new_slide(tenant.id, sha256="a" * 64, size_bytes=1, fmt="svs", mpp_override=None, info={})
        s.add(slide)
    return settings, store, tenant.id, slide.id


def _profile(shift: float = 0.0) -> bytes:
    return canonical_bytes(profile_from_lists(["TP53", "EGFR", "KRAS"], [1.25 + shift, 0.5, 3.0]))


def test_canonical_form_is_independent_of_format_and_order() -> None:
    a = _profile()
    b = canonical_bytes(read_profile(b"gene\tvalue\nkras\t3\nTP53\t1.25\nEGFR\t0.5\n"))
    c = canonical_bytes(
        read_profile(
            "gene_id,gene_name,gene_type,tpm_unstranded\n"
            + f"ENSG1.1,TP53,pc,{math.expm1(1.25)!r}\nENSG2.3,EGFR,pc,{math.expm1(0.5)!r}\nENSG3,KRAS,pc,"
            + f"{math.expm1(3.0)!r}\n"
        )
    )
    assert a == b and read_profile(a) == {"TP53": 1.25, "EGFR": 0.5, "KRAS": 3.0}
    assert read_profile(c) == pytest.approx(read_profile(a), abs=1e-12)  # GDC TPM -> log1p, the house scale
    assert rna_channel.digest(a) != rna_channel.digest(_profile(1e-9))


def test_read_checks_the_digest_and_says_when_the_profile_is_gone(env) -> None:
    _, store, _, _ = env
    data = _profile()
    rna_channel.put(store.blobs, "job1", data)
    assert rna_channel.read(store.blobs, "job1", rna_channel.digest(data)) == data
    assert rna_channel.read(store.blobs, "job1", rna_channel.digest(data)) == data  # a retried attempt reads it too
    with pytest.raises(rna_channel.RnaProfileGoneError, match="no longer held"):
        rna_channel.read(store.blobs, "job1", rna_channel.digest(_profile(1.0)))
    rna_channel.discard(store.blobs, ["job1", "never-held"])
    with pytest.raises(rna_channel.RnaProfileGoneError) as err:
        rna_channel.read(store.blobs, "job1", rna_channel.digest(data))
    assert err.value.code == "rna_expired"


def test_submit_keys_reuse_on_the_profile_digest_and_keeps_nothing_in_the_row(env) -> None:
    settings, store, tenant_id, slide_id = env
    queue = EmbeddedRunner(settings)  # not started: the jobs stay queued
    common = dict(tenant_id=tenant_id, slide_id=slide_id, slide_sha256="a" * 64, bundle_version="v1", blobs=store.blobs)

    def submit(rna, **kw):
        return submit_analysis(
            store.sessions, queue, settings, options={"tasks": ["survival"]}, rna=rna, **common, **kw
        )

    first = submit(_profile()).job
    other = submit(_profile(0.75)).job  # differs only in RNA: its own job, never merged
    same = submit(_profile()).job  # identical: follows the first, and holds its own copy should it be released
    plain = submit_analysis(store.sessions, queue, settings, options={"tasks": ["survival"]}, **common).job
    assert other.follows is None and same.follows == first.id and plain.follows is None
    assert len({first.id, other.id, same.id, plain.id}) == 4
    held = {k.rsplit("/", 1)[-1] for k, _ in store.blobs.list_prefix(rna_channel.PREFIX)}
    assert held == {first.id, other.id, same.id}
    with transaction(store.sessions) as s:
        row = s.get(Job, first.id)
        assert row.options == {"tasks": ["survival"], "rna_sha256": rna_channel.digest(_profile())}
    # an Idempotency-Key replay records nothing new and keeps no second copy
    again = submit(_profile(), idempotency_key="k1")
    replay = submit(_profile(), idempotency_key="k1")
    assert replay.created is False and replay.job.id == again.job.id
    held = {k.rsplit("/", 1)[-1] for k, _ in store.blobs.list_prefix(rna_channel.PREFIX)}
    assert held == {first.id, other.id, same.id, again.job.id}


def test_sweep_removes_ended_deleted_and_expired_profiles_only(env) -> None:
    _, store, tenant_id, slide_id = env
    ids = {}
    with transaction(store.sessions) as s:
        for name in ("queued", "running", "succeeded", "canceled", "old_queued"):
            ids[name] = lifecycle.create(s, tenant_id=tenant_id, slide_id=slide_id, options={}, job_id=name + "x" * 8)[
                0
            ].id
        for name, state in (("running", "running"), ("succeeded", "succeeded"), ("canceled", "canceled")):
            s.get(Job, ids[name]).state = state
    for job_id in [*ids.values(), "no-row-yet", "no-row-old"]:
        rna_channel.put(store.blobs, job_id, _profile())
    now = time.time()
    for job_id, age in (("no-row-old", rna_channel.ORPHAN_GRACE_S + 5), (ids["old_queued"], 3600 + 5)):
        path = store.blobs.local_path(rna_channel.key_for(job_id))
        os.utime(path, (now - age, now - age))
    assert rna_channel.sweep(store.sessions, store.blobs, ttl_s=3600, now=now) == 4
    held = {k.rsplit("/", 1)[-1] for k, _ in store.blobs.list_prefix(rna_channel.PREFIX)}
    assert held == {ids["queued"], ids["running"], "no-row-yet"}  # still needed (a retry reads the running one's)
    assert rna_channel.sweep(store.sessions, store.blobs, ttl_s=3600, now=now) == 0
