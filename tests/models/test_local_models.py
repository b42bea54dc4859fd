"""The edge's own batcher for models in its process (`PTX_MODELS_IN_EDGE`): our batching logic, on a stub model.

The served path (a real `bentoml serve` with the setting) is tests/http/test_models_in_edge.py.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.errors import ServiceError
from service.models.local_models import GreedyBatcher
from service.models.runner import pack


class StubModel:
    """Doubles each film's first pixel; records batch sizes; holds the first batch until released."""

    def __init__(self, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.release = threading.Event()
        self.fail = fail

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        self.release.wait(timeout=10)
        if self.fail:
            raise RuntimeError("the run failed")
        return pack(batch[:, 0, 0, :2] * 2, seconds=0.001)


def film(value: float) -> np.ndarray:
    return np.full((1, 1, 4, 4), value, dtype=np.float32)


async def _calls(model: StubModel, values: list[float], max_batch_size: int) -> list[object]:
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = GreedyBatcher("classifier", model, executor, max_batch_size, (2,), retry_after_s=3)
        first = asyncio.ensure_future(batcher(film(values[0])))
        await asyncio.sleep(0.05)  # the first film is running alone: the model was idle when it came
        rest = [asyncio.ensure_future(batcher(film(value))) for value in values[1:]]
        await asyncio.sleep(0.05)
        model.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)


def test_calls_that_queue_behind_a_running_batch_run_together_and_each_gets_its_own_rows():
    model = StubModel()
    values = [float(v) for v in range(1, 8)]
    outputs = asyncio.run(_calls(model, values, max_batch_size=4))
    assert model.sizes == [1, 4, 2]  # greedy: at once when idle, then the queue in batches of at most 4
    for value, output in zip(values, outputs):
        assert np.array_equal(output, [[2 * value, 2 * value]])


def test_a_failed_run_answers_every_film_of_its_batch_503_model_unavailable():
    model = StubModel(fail=True)
    outputs = asyncio.run(_calls(model, [1.0, 2.0, 3.0], max_batch_size=16))
    assert model.sizes == [1, 2]
    for output in outputs:
        assert isinstance(output, ServiceError)
        assert (output.code_text, output.http_status) == ("model_unavailable", 503)
        assert "classifier is out of service" in str(output)
        assert output.headers.get("Retry-After") == "3"


def test_a_caller_that_gives_up_does_not_stop_the_others():
    async def scenario() -> tuple[list[int], np.ndarray]:
        model = StubModel()
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = GreedyBatcher("segmenter", model, executor, 8, (2,), retry_after_s=1)
            first = asyncio.ensure_future(batcher(film(1.0)))
            await asyncio.sleep(0.05)
            gone = asyncio.ensure_future(batcher(film(2.0)))
            kept = asyncio.ensure_future(batcher(film(3.0)))
            await asyncio.sleep(0.05)
            gone.cancel()
            model.release.set()
            await first
            return model.sizes, await kept

    sizes, kept = asyncio.run(scenario())
    assert sizes == [1, 2]  # the cancelled film was already queued: it ran, its row was dropped
    assert np.array_equal(kept, [[6.0, 6.0]])


@pytest.mark.parametrize("rows", [2, 3])
def test_a_call_is_never_split_across_batches(rows):
    """A multi-row call goes whole into one batch, even past max_batch_size when it is alone."""
    async def scenario() -> list[int]:
        model = StubModel()
        model.release.set()
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = GreedyBatcher("classifier", model, executor, 2, (2,), retry_after_s=1)
            output = await batcher(np.concatenate([film(float(v)) for v in range(rows)]))
            assert output.shape == (rows, 2)
        return model.sizes

    assert asyncio.run(scenario()) == [rows]


def test_with_two_instances_a_second_batch_runs_beside_the_first():
    """PTX_MODEL_INSTANCES=2: a film that comes while one batch runs starts at once on the second instance."""
    async def scenario() -> tuple[list[int], int]:
        model = StubModel()
        with ThreadPoolExecutor(max_workers=2) as executor:
            batcher = GreedyBatcher("classifier", model, executor, 8, (2,), retry_after_s=1, instances=2)
            calls = [asyncio.ensure_future(batcher(film(0.0)))]
            await asyncio.sleep(0.05)
            calls.append(asyncio.ensure_future(batcher(film(1.0))))
            await asyncio.sleep(0.05)
            calls += [asyncio.ensure_future(batcher(film(float(v)))) for v in range(2, 5)]
            await asyncio.sleep(0.05)
            most = batcher.running
            model.release.set()
            await asyncio.gather(*calls)
        return model.sizes, most

    sizes, most = asyncio.run(scenario())
    assert sizes == [1, 1, 3] and most == 2  # two at once; the next three wait for a free instance, together
