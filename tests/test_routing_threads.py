"""Fixed routing is per thread: one model serves concurrent threads with the answers of sequential calls.

``record_routes`` / ``fixed_routes`` blocks (and ``restore()``, which uses them) affect only the forwards
of the thread that opened them; copies of a model made inside a block carry no routes. The threads
here are bounded (joined with a timeout) and every result is compared with the sequential one.
"""
import copy
import io
import threading

import pytest
import torch

from _models import FILES, load_data, model_for
from moce_kernels import restore
from moce_kernels.model.fixed_routing import fixed_routes, record_routes
from moce_kernels.model.moe import AdapterLayer

JOIN_S = 120  # per thread; the work is a few forwards of a dim-8 model


@pytest.fixture(scope="module")
def model(reference_dir):
    return model_for(load_data(reference_dir, FILES[1]))  # the top-2 tiny reference configuration (dim 8)


def _images():
    """Two images the tiny model routes differently: a dark, faintly noisy one and uniform noise (fixed seed)."""
    g = torch.Generator().manual_seed(7)
    dark = 0.05 + 0.02 * torch.rand(1, 3, 40, 48, generator=g)
    noise = torch.rand(1, 3, 40, 48, generator=g)
    return dark, noise


def _run_threads(*targets):
    """Start the targets together (a barrier), join them, re-raise the first error of any."""
    barrier = threading.Barrier(len(targets))
    errors = []

    def wrap(fn):
        def run():
            try:
                barrier.wait(timeout=JOIN_S)
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive(), "a thread did not finish"
    if errors:
        raise errors[0]


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=what)


def _restore(model, image):
    return restore(model, image, tile=32, overlap=8, tile_batch=2)


def test_images_route_differently(model):
    """The premise of the tests below: the two images take different experts somewhere."""
    dark, noise = _images()
    with torch.no_grad():
        with model.record_routes() as ra:
            model(dark)
        with model.record_routes() as rb:
            model(noise)
    assert any(not torch.equal(ra[n].indices, rb[n].indices) for n in ra)


def test_two_threads_restoring_on_one_model_get_their_sequential_answers(model):
    images = _images()
    want = [_restore(model, im) for im in images]
    got = {0: [], 1: []}

    def worker(i):
        return lambda: [got[i].append(_restore(model, images[i])) for _ in range(2)]

    _run_threads(worker(0), worker(1))
    for i in (0, 1):
        assert len(got[i]) == 2
        for n, out in enumerate(got[i]):
            _close(out, want[i], f"thread {i}, call {n}")


def test_a_forward_in_another_thread_ignores_an_open_block(model):
    dark, noise = _images()
    with torch.no_grad():
        own = model(noise)
        with model.record_routes() as dark_routes:
            model(dark)
    entered, done = threading.Event(), threading.Event()
    results = {}

    def holder():  # thread A: holds a fixed_routes block (the dark's routes) while B runs
        with torch.no_grad(), model.fixed_routes(dark_routes):
            entered.set()
            assert done.wait(JOIN_S)
            results["a"] = model(noise)

    def other():  # thread B: a plain forward, with grad recording as a user would call it
        assert entered.wait(JOIN_S)
        try:
            results["b"] = model(noise).detach()
        finally:
            done.set()

    _run_threads(holder, other)
    _close(results["b"], own, "thread B routes on its own")
    assert not torch.allclose(results["a"], own, atol=1e-4), "thread A runs with the dark's routes"


def test_restore_in_one_thread_and_forwards_in_another(model):
    dark, noise = _images()
    small = noise[..., :24, :32]
    want_restore = _restore(model, dark)
    with torch.no_grad():
        want_forward = model(small)
    restored, forwards = [], []

    def restorer():
        for _ in range(2):
            restored.append(_restore(model, dark))

    def forwarder():
        with torch.no_grad():
            for _ in range(6):
                forwards.append(model(small))

    _run_threads(restorer, forwarder)
    assert len(restored) == 2 and len(forwards) == 6
    for n, out in enumerate(restored):
        _close(out, want_restore, f"restore {n}")
    for n, out in enumerate(forwards):
        _close(out, want_forward, f"forward {n}")


def test_copies_made_inside_a_block_do_not_replay_its_routes(model):
    dark, noise = _images()
    with torch.no_grad():
        own = model(noise)
        with model.record_routes() as dark_routes:
            model(dark)
        with model.fixed_routes(dark_routes):
            replayed = model(noise)
            clone = copy.deepcopy(model)
            buf = io.BytesIO()
            torch.save(model, buf)
        assert not torch.allclose(replayed, own, atol=1e-4), "the block changes the answer"
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        _close(clone(noise), own, "deepcopy")
        _close(loaded(noise), own, "torch.save / torch.load")
        _close(model(noise), own, "the model itself after the block")


def test_compiled_layer_follows_the_calling_threads_block():
    """torch.compile traces the per-thread overrides and guards on them: inside a block the compiled
    MoCE layer replays its routes; in another thread, and after the block, it routes on its own."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = AdapterLayer(8, 2, top_k=2, freq_dim=16, routing_noise="never").eval()
    x, sh = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    fe = torch.randn(2, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        own = layer(x, fe, sh)
        with record_routes(layer) as routes:
            layer(x.flip(0), fe.flip(0), sh)  # each row gets the other row's route
        with fixed_routes(layer, routes):
            replayed = layer(x, fe, sh)
            assert not torch.allclose(replayed, own, atol=1e-4), "the rows' routes differ"
            _close(compiled(x, fe, sh), replayed, "compiled, inside the block")
            other = []
            t = threading.Thread(target=lambda: other.append(compiled(x, fe, sh).detach()))
            t.start()
            t.join(JOIN_S)
        assert len(other) == 1
        _close(other[0], own, "compiled, another thread")
        _close(compiled(x, fe, sh), own, "compiled, after the block")
