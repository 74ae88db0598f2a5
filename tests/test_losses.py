"""The Stage I losses against plain references written here, on small tensors."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from finedefics.align.losses import Batch, Temperature, contrastive_terms, gather, object_category_terms, stage1_total

TAU = 0.1


def cos(x, y):
    return float(torch.dot(x, y) / (x.norm() * y.norm()))


def e(x, y):
    return math.exp(cos(x, y) / TAU)


def keep(i, j, labels, mask):
    return j == i or not (mask and labels[j] == labels[i])


def ref_terms(b: Batch, mask: bool) -> dict[str, float]:
    """Eqs. 5-7 as written in the paper, one object at a time."""
    B, lab = len(b.o), b.labels.tolist()
    out = {"oa": 0.0, "ao": 0.0, "ac": 0.0, "ca": 0.0, "ccc": 0.0}
    for i in range(B):
        den = sum(e(b.o[i], b.a[j]) for j in range(B) if keep(i, j, lab, mask)) + sum(e(b.o[i], w) for w in b.a_hn[i])
        out["oa"] -= math.log(e(b.o[i], b.a[i]) / den)
        den = sum(e(b.o[k], b.a[i]) for k in range(B) if keep(i, k, lab, mask))
        out["ao"] -= math.log(e(b.o[i], b.a[i]) / den)
        den = sum(e(b.a[i], b.c[j]) for j in range(B) if keep(i, j, lab, mask)) + sum(e(b.a[i], w) for w in b.c_hn[i])
        out["ac"] -= math.log(e(b.a[i], b.c[i]) / den)
        den = sum(e(b.a[j], b.c[i]) for j in range(B) if keep(i, j, lab, mask)) + sum(e(w, b.c[i]) for w in b.a_hn[i])
        out["ca"] -= math.log(e(b.a[i], b.c[i]) / den)
        if len(b.c_hn[i]):
            out["ccc"] -= math.log(1 / sum(e(b.c[i], w) for w in b.c_hn[i]))
    return {k: v / B for k, v in out.items()}


def toy_batch(seed=0, B=6, K=3, d=8, labels=(0, 1, 1, 2, 3, 3)) -> Batch:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return Batch(r(B, d), r(B, d), r(B, d), torch.tensor(labels), r(B, K, d), r(B, K, d))


@pytest.mark.parametrize("mask", [True, False])
def test_each_term_matches_the_paper(mask):
    b = toy_batch()
    got = contrastive_terms(b, torch.tensor(TAU, dtype=torch.float64), mask, ccc="logsumexp")  # eq. 7 as written
    want = ref_terms(b, mask)
    assert set(got) == set(want)
    for k in want:
        assert got[k].item() == pytest.approx(want[k], rel=1e-9), k


def test_bounded_ccc_takes_the_name_itself_as_positive():
    b = toy_batch()
    got = contrastive_terms(b, torch.tensor(TAU, dtype=torch.float64), True, ccc="bounded")["ccc"].item()
    self_term = math.exp(1 / TAU)  # a name's cosine with itself is 1
    want = sum(
        -math.log(self_term / (self_term + sum(e(b.c[i], w) for w in b.c_hn[i]))) for i in range(len(b.c))
    ) / len(b.c)
    assert got == pytest.approx(want, rel=1e-9) and got >= 0
    # as written (logsumexp) it is unbounded below: far-apart names drive it negative, the bounded form to 0
    apart = Batch(b.o, b.a, b.c, b.labels, b.a_hn, -b.c[:, None, :].repeat(1, 3, 1))
    tau = torch.tensor(TAU, dtype=torch.float64)
    assert contrastive_terms(apart, tau, True, ccc="logsumexp")["ccc"].item() == pytest.approx(-1 / TAU + math.log(3))
    assert contrastive_terms(apart, tau, True, ccc="bounded")["ccc"].item() == pytest.approx(0, abs=1e-8)


def test_masking_only_matters_with_repeated_classes():
    b = toy_batch(labels=(0, 1, 2, 3, 4, 5))
    tau = torch.tensor(TAU, dtype=torch.float64)
    on, off = contrastive_terms(b, tau, True, "bounded"), contrastive_terms(b, tau, False, "bounded")
    assert all(torch.equal(on[k], off[k]) for k in on)


def test_without_negatives_the_hard_negative_terms_drop():
    b = toy_batch()
    plain = Batch(b.o, b.a, b.c, b.labels)
    got = contrastive_terms(plain, torch.tensor(TAU, dtype=torch.float64), True, "bounded")
    assert set(got) == {"oa", "ao", "ac", "ca"}
    none = Batch(b.o, b.a, b.c, b.labels, b.a_hn[:, :0], b.c_hn[:, :0])
    ref = ref_terms(none, True)
    for k in got:
        assert got[k].item() == pytest.approx(ref[k], rel=1e-9)


def test_object_category_terms():
    b = toy_batch()
    got = object_category_terms(b, torch.tensor(TAU, dtype=torch.float64), True, ccc="logsumexp")
    as_oa = ref_terms(Batch(b.o, b.c, b.c, b.labels, b.c_hn, b.c_hn), True)  # o against c, c's negatives
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


def test_temperature_is_learnable_and_clamped():
    t = Temperature(0.07)
    assert t().item() == pytest.approx(0.07)
    with torch.no_grad():
        t.value.fill_(2.0)
    assert t().item() == 0.5
    with torch.no_grad():
        t.value.fill_(-1.0)
    assert t().item() == pytest.approx(0.001)
    with torch.no_grad():
        t.value.fill_(0.07)
    b = toy_batch()
    b = Batch(*(x.float() if x.is_floating_point() else x for x in (b.o, b.a, b.c, b.labels, b.a_hn, b.c_hn)))
    stage1_total(contrastive_terms(b, t(), True, "bounded"), None).backward()
    assert t.value.grad is not None and t.value.grad != 0


def _free_port() -> int:
    """A port the OS reports free now; a port derived from the pid could collide with another
    test run's (or anything else listening) and fail the rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    terms = contrastive_terms(gather(Batch(*local)), torch.tensor(TAU, dtype=torch.float64), True, "logsumexp")
    loss = stage1_total(terms, None)
    loss.backward()
    queue.put((rank, loss.item(), local[0].grad.tolist()))  # plain data: the process exits next
    dist.destroy_process_group()


def test_two_processes_see_the_negatives_of_both():
    """Gathered with gradient (gloo), the loss equals the single-process loss on the global batch,
    and each process's features get the gradient of the global loss summed over processes (DDP's
    average over processes then gives the global gradient)."""
    full = toy_batch(B=8, labels=(0, 1, 1, 2, 3, 3, 4, 0))
    o = full.o.clone().requires_grad_(True)
    loss = stage1_total(
        contrastive_terms(
            Batch(o, full.a, full.c, full.labels, full.a_hn, full.c_hn),
            torch.tensor(TAU, dtype=torch.float64),
            True,
            "logsumexp",
        ),
        None,
    )
    loss.backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, value, grad in results:
        assert value == pytest.approx(loss.item(), rel=1e-12)
        torch.testing.assert_close(
            torch.tensor(grad, dtype=torch.float64), 2 * o.grad[rank * 4 : rank * 4 + 4], rtol=1e-10, atol=1e-12
        )
