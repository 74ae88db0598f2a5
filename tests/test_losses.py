"""The Stage I losses against plain references written here, on small tensors."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from finedefics.align.losses import (
    Batch,
    LossForm,
    StepTemperatures,
    Temperatures,
    category_category,
    contrastive_set,
    contrastive_terms,
    object_category_terms,
    stage1_total,
)

TAU = 0.1


def cos(x, y):
    return float(torch.dot(x, y) / (x.norm() * y.norm()))


def e(x, y, tau=TAU):
    return math.exp(cos(x, y) / tau)


def keep(i, j, labels, mask):
    return j == i or not (mask and labels[j] == labels[i])


def taus(oa=TAU, ac=None) -> StepTemperatures:
    return StepTemperatures(
        torch.tensor(oa, dtype=torch.float64), torch.tensor(oa if ac is None else ac, dtype=torch.float64)
    )


def ref_terms(b: Batch, mask: bool, scope: str = "own", tau_oa: float = TAU, tau_ac: float = TAU) -> dict[str, float]:
    """Eqs. 5-7 as written in the paper, one object at a time; with scope "batch" every row's
    negatives are all those of the batch."""
    B, lab = len(b.o), b.labels.tolist()

    def negatives(hn, i):
        return list(hn[i]) if scope == "own" else [w for row in hn for w in row]

    def ea(x, y):
        return e(x, y, tau_oa)

    def ec(x, y):
        return e(x, y, tau_ac)

    out = {"oa": 0.0, "ao": 0.0, "ac": 0.0, "ca": 0.0, "ccc": 0.0}
    for i in range(B):
        den = sum(ea(b.o[i], b.a[j]) for j in range(B) if keep(i, j, lab, mask))
        den += sum(ea(b.o[i], w) for w in negatives(b.a_hn, i))
        out["oa"] -= math.log(ea(b.o[i], b.a[i]) / den)
        den = sum(ea(b.o[k], b.a[i]) for k in range(B) if keep(i, k, lab, mask))
        out["ao"] -= math.log(ea(b.o[i], b.a[i]) / den)
        den = sum(ec(b.a[i], b.c[j]) for j in range(B) if keep(i, j, lab, mask))
        den += sum(ec(b.a[i], w) for w in negatives(b.c_hn, i))
        out["ac"] -= math.log(ec(b.a[i], b.c[i]) / den)
        den = sum(ec(b.a[j], b.c[i]) for j in range(B) if keep(i, j, lab, mask))
        den += sum(ec(w, b.c[i]) for w in negatives(b.a_hn, i))
        out["ca"] -= math.log(ec(b.a[i], b.c[i]) / den)
        if negatives(b.c_hn, i):
            out["ccc"] -= math.log(1 / sum(ea(b.c[i], w) for w in negatives(b.c_hn, i)))
    return {k: v / B for k, v in out.items()}


def ref_release_ccc(c, c_hn, tau) -> float:
    """Eq. 7 as the release computes it: every name against [all names; all negatives], target column 0."""
    columns = list(c) + [w for row in c_hn for w in row]
    return sum(-math.log(e(ci, columns[0], tau) / sum(e(ci, x, tau) for x in columns)) for ci in c) / len(c)


def toy_batch(seed=0, B=6, K=3, d=8, labels=(0, 1, 1, 2, 3, 3)) -> Batch:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return Batch(r(B, d), r(B, d), r(B, d), torch.tensor(labels), r(B, K, d), r(B, K, d))


@pytest.mark.parametrize("scope", ["own", "batch"])
@pytest.mark.parametrize("mask", [True, False])
def test_each_term_matches_the_paper(mask, scope):
    b = toy_batch()
    got = contrastive_terms(b, taus(), LossForm(mask, ccc="logsumexp", negatives_scope=scope))  # eq. 7 as written
    want = ref_terms(b, mask, scope)
    assert set(got) == set(want)
    for k in want:
        assert got[k].item() == pytest.approx(want[k], rel=1e-9), k


def test_two_temperatures_each_in_its_own_terms():
    b = toy_batch()
    got = contrastive_terms(b, taus(0.1, 0.25), LossForm(ccc="logsumexp", negatives_scope="batch"))
    want = ref_terms(b, True, "batch", tau_oa=0.1, tau_ac=0.25)
    for k in want:
        assert got[k].item() == pytest.approx(want[k], rel=1e-9), k


@pytest.mark.parametrize("scope", ["own", "batch"])
def test_bounded_ccc_takes_the_name_itself_as_positive(scope):
    b = toy_batch()
    got = contrastive_terms(b, taus(), LossForm(ccc="bounded", negatives_scope=scope))["ccc"].item()
    self_term = math.exp(1 / TAU)  # a name's cosine with itself is 1
    negatives = lambda i: b.c_hn[i] if scope == "own" else b.c_hn.flatten(0, 1)  # noqa: E731
    want = sum(
        -math.log(self_term / (self_term + sum(e(b.c[i], w) for w in negatives(i)))) for i in range(len(b.c))
    ) / len(b.c)
    assert got == pytest.approx(want, rel=1e-9) and got >= 0


def test_logsumexp_ccc_is_unbounded_below():
    """Far-apart names drive eq. 7 as written negative, the bounded form to 0."""
    b = toy_batch()
    apart = Batch(b.o, b.a, b.c, b.labels, b.a_hn, -b.c[:, None, :].repeat(1, 3, 1))
    logsumexp = contrastive_terms(apart, taus(), LossForm(ccc="logsumexp"))["ccc"].item()
    assert logsumexp == pytest.approx(-1 / TAU + math.log(3))
    assert contrastive_terms(apart, taus(), LossForm(ccc="bounded"))["ccc"].item() == pytest.approx(0, abs=1e-8)


def test_release_ccc_matches_a_hand_computation():
    b = toy_batch(seed=1, B=4, K=3, labels=(0, 1, 2, 3))
    tau = 0.2
    got = category_category(b.c, b.c_hn, torch.tensor(tau, dtype=torch.float64), LossForm(ccc="release"))
    assert got.item() == pytest.approx(ref_release_ccc(b.c, b.c_hn, tau), rel=1e-9)
    got = contrastive_terms(b, taus(tau, 0.05), LossForm(ccc="release"))[
        "ccc"
    ]  # at taus.object_attribute, whatever the scope
    assert got.item() == pytest.approx(ref_release_ccc(b.c, b.c_hn, tau), rel=1e-9)


def test_release_ccc_of_one_name_is_the_bounded_form():
    b = toy_batch(B=1, labels=(0,))
    tau = torch.tensor(0.2, dtype=torch.float64)
    release = category_category(b.c, b.c_hn, tau, LossForm(ccc="release"))
    assert release.item() == pytest.approx(category_category(b.c, b.c_hn, tau, LossForm()).item(), rel=1e-9)


def test_release_ccc_pulls_every_name_towards_the_first():
    b = toy_batch(seed=2, B=4, K=3, labels=(0, 1, 2, 3))
    c = b.c.clone().requires_grad_(True)
    category_category(c, b.c_hn, torch.tensor(TAU, dtype=torch.float64), LossForm(ccc="release")).backward()
    stepped = c.detach() - 1e-3 * c.grad
    for i in range(1, 4):
        assert cos(stepped[i], stepped[0]) > cos(b.c[i], b.c[0]), i
    # rows i > 0 are not at rest even with names orthogonal and far from every negative: row 0 is
    # ~0, each other row ~1/tau (its own name outweighs the target c_0)
    names = torch.eye(4, 8, dtype=torch.float64)
    far = -names.sum(0).expand(4, 3, 8)
    tau = torch.tensor(TAU, dtype=torch.float64)
    assert category_category(names, far, tau, LossForm()).item() == pytest.approx(0, abs=1e-3)
    release = category_category(names, far, tau, LossForm(ccc="release")).item()
    assert release == pytest.approx(3 / 4 / TAU, rel=1e-3)
    assert release == pytest.approx(ref_release_ccc(names, far, TAU), rel=1e-9)


def test_scopes_agree_on_one_sample():
    b = toy_batch(B=1, labels=(0,))
    for ccc in ("bounded", "logsumexp", "release"):
        own = contrastive_terms(b, taus(), LossForm(ccc=ccc))
        batch = contrastive_terms(b, taus(), LossForm(ccc=ccc, negatives_scope="batch"))
        assert set(own) == set(batch)
        for k in own:
            assert own[k].item() == pytest.approx(batch[k].item(), rel=1e-12), (ccc, k)


def test_unknown_form_is_refused():
    with pytest.raises(ValueError):
        LossForm(ccc="bounde")
    with pytest.raises(ValueError):
        LossForm(negatives_scope="all")


def test_masking_only_matters_with_repeated_classes():
    b = toy_batch(labels=(0, 1, 2, 3, 4, 5))
    on, off = contrastive_terms(b, taus(), LossForm(True)), contrastive_terms(b, taus(), LossForm(False))
    assert all(torch.equal(on[k], off[k]) for k in on)


@pytest.mark.parametrize("scope", ["own", "batch"])
def test_without_negatives_the_hard_negative_terms_drop(scope):
    b = toy_batch()
    plain = Batch(b.o, b.a, b.c, b.labels)
    got = contrastive_terms(plain, taus(), LossForm(negatives_scope=scope))
    assert set(got) == {"oa", "ao", "ac", "ca"}
    none = Batch(b.o, b.a, b.c, b.labels, b.a_hn[:, :0], b.c_hn[:, :0])
    ref = ref_terms(none, True)
    for k in got:
        assert got[k].item() == pytest.approx(ref[k], rel=1e-9)


@pytest.mark.parametrize("scope", ["own", "batch"])
def test_object_category_terms(scope):
    b = toy_batch()
    got = object_category_terms(b, taus(ac=0.3), LossForm(ccc="logsumexp", negatives_scope=scope))  # all at oa
    as_oa = ref_terms(Batch(b.o, b.c, b.c, b.labels, b.c_hn, b.c_hn), True, scope)  # o against c, c's negatives
    assert got["oc"].item() == pytest.approx(as_oa["oa"], rel=1e-9)
    assert got["co"].item() == pytest.approx(as_oa["ao"], rel=1e-9)
    assert got["ccc"].item() == pytest.approx(as_oa["ccc"], rel=1e-9)


def test_total_is_eq_8():
    terms = {k: torch.tensor(v) for k, v in {"oa": 1.0, "ao": 2.0, "ac": 3.0, "ca": 4.0, "ccc": 5.0}.items()}
    assert stage1_total(terms, torch.tensor(0.5)).item() == pytest.approx(0.5 + ((1 + 2) / 2 + (3 + 4) / 2 + 5) / 2)
    assert stage1_total({k: terms[k] for k in ("oa", "ao", "ac", "ca")}, None).item() == pytest.approx(
        ((1 + 2) / 2 + (3 + 4) / 2) / 2
    )
    assert stage1_total({}, torch.tensor(0.5)).item() == 0.5  # objective none: generation only
    oc = {k: torch.tensor(v) for k, v in {"oc": 1.0, "co": 4.0, "ccc": 2.0}.items()}
    assert stage1_total(oc, None).item() == pytest.approx(((1 + 4) / 2 + 2) / 2)  # obj-cat: (L_OCC + L_CCC) / 2
    assert stage1_total({"oc": oc["oc"], "co": oc["co"]}, torch.tensor(0.5)).item() == pytest.approx(0.5 + 5 / 4)


def float_batch() -> Batch:
    b = toy_batch()
    return Batch(*(x.float() if x.is_floating_point() else x for x in (b.o, b.a, b.c, b.labels, b.a_hn, b.c_hn)))


def test_temperature_is_learnable_and_clamped():
    t = Temperatures(0.07, two=False, learn=True)
    assert [p is t.oa for p in t.parameters()] == [True]
    now = t()
    assert now.object_attribute.item() == pytest.approx(0.07) and now.attribute_category is now.object_attribute
    with torch.no_grad():
        t.oa.fill_(2.0)
    assert t().object_attribute.item() == 0.5 and t().attribute_category.item() == 0.5
    with torch.no_grad():
        t.oa.fill_(-1.0)
    assert t().object_attribute.item() == pytest.approx(0.001)
    with torch.no_grad():
        t.oa.fill_(0.07)
    stage1_total(contrastive_terms(float_batch(), t(), LossForm()), None).backward()
    assert t.oa.grad is not None and t.oa.grad != 0


def test_two_temperatures_get_the_gradient_of_their_own_terms_only():
    t = Temperatures(0.07, two=True, learn=True)
    assert len(list(t.parameters())) == 2 and t.oa is not t.ac
    assert t().object_attribute.item() == pytest.approx(0.07) and t().attribute_category.item() == pytest.approx(0.07)
    b = float_batch()
    for form in (LossForm(ccc="release"), LossForm(negatives_scope="batch")):
        terms = contrastive_terms(b, t(), form)
        terms.update({"obj-cat " + k: v for k, v in object_category_terms(b, t(), form).items()})
        for k, term in terms.items():
            grads = torch.autograd.grad(term, [t.oa, t.ac], retain_graph=True, allow_unused=True)
            used = [g is not None and bool(g != 0) for g in grads]
            assert used == ([True, False] if k in ("oa", "ao", "ccc") or k.startswith("obj-cat") else [False, True]), k


@pytest.mark.parametrize("two", [False, True])
def test_frozen_temperatures_are_clamped_buffers(two):
    t = Temperatures(2.0, two=two, learn=False)
    assert list(t.parameters()) == [] and {n for n, _ in t.named_buffers()} == ({"oa", "ac"} if two else {"oa"})
    assert (
        t().object_attribute.item() == 0.5
        and t().attribute_category.item() == 0.5
        and not t().object_attribute.requires_grad
        and not t().attribute_category.requires_grad
    )
    assert Temperatures(-1.0, two=two, learn=False)().attribute_category.item() == pytest.approx(0.001)
    b = float_batch()
    b.o.requires_grad_(True)
    stage1_total(contrastive_terms(b, t(), LossForm()), None).backward()
    assert b.o.grad is not None and all(x.grad is None for x in t.buffers())


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    full = toy_batch(B=8, labels=(0, 1, 1, 2, 3, 3, 4, 0))
    share = slice(rank * 4, rank * 4 + 4)
    local = [
        x[share].clone().requires_grad_(x.is_floating_point())
        for x in (full.o, full.a, full.c, full.labels, full.a_hn, full.c_hn)
    ]
    form = LossForm(ccc="logsumexp")
    terms = contrastive_terms(contrastive_set(Batch(*local), form), taus(), form)
    loss = stage1_total(terms, None)
    loss.backward()
    device = LossForm(ccc="logsumexp", contrastive_batch="device")  # the release: no gathering
    own = contrastive_terms(contrastive_set(Batch(*[x.detach() for x in local]), device), taus(), device)
    own = {k: v.item() for k, v in own.items()}
    queue.put((rank, loss.item(), local[0].grad.tolist(), own))  # plain data: the process exits next
    dist.destroy_process_group()


def test_two_processes_see_the_negatives_of_both():
    """Gathered with gradient (gloo), the loss equals the single-process loss on the global batch,
    and each process's features get the gradient of the global loss summed over processes (DDP's
    average over processes then gives the global gradient). With `contrastive_batch: device` (the
    release) each process's terms are those of its own micro-batch, by hand."""
    full = toy_batch(B=8, labels=(0, 1, 1, 2, 3, 3, 4, 0))
    o = full.o.clone().requires_grad_(True)
    loss = stage1_total(
        contrastive_terms(
            Batch(o, full.a, full.c, full.labels, full.a_hn, full.c_hn), taus(), LossForm(ccc="logsumexp")
        ),
        None,
    )
    loss.backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, value, grad, own in results:
        assert value == pytest.approx(loss.item(), rel=1e-12)
        half = Batch(*(x[rank * 4 : rank * 4 + 4] for x in (full.o, full.a, full.c, full.labels, full.a_hn, full.c_hn)))
        want = ref_terms(half, mask=True)  # contrastive_batch device: this process's micro-batch alone
        assert own == pytest.approx(want, rel=1e-9)
        torch.testing.assert_close(
            torch.tensor(grad, dtype=torch.float64), 2 * o.grad[rank * 4 : rank * 4 + 4], rtol=1e-10, atol=1e-12
        )
