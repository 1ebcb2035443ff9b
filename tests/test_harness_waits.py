"""The server harness's waits fail on silence (a hang), not on total time (a loaded machine)."""
import time

import pytest

pytestmark = pytest.mark.server


def test_silence_is_a_hang(server):
    with pytest.raises(TimeoutError, match="no progress from the server for 2s"):
        server.until(lambda: False, "a prompt that never finishes", idle_timeout=2)


def test_steady_progress_outlasts_the_idle_limit(server):
    end = time.monotonic() + 3  # three idle limits long, with a sign of life on every poll
    assert server.until(lambda: time.monotonic() > end, "a slow but busy prompt",
                        activity=(time.monotonic,), idle_timeout=1)


def test_endless_progress_stops_at_the_total_limit(server):
    with pytest.raises(TimeoutError, match="still running after 2s"):
        server.until(lambda: False, "a prompt that reports progress forever",
                     activity=(time.monotonic,), idle_timeout=1, timeout=2)


def test_progress_messages_reach_the_harness(server):
    """Queued prompts report to the harness's own websocket client (what `wait` counts on)."""
    from comfy_fixtures import CKPT

    before = server.messages_received()
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
             "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                        "latent_image": ["3", 0], "seed": 0, "steps": 3, "cfg": 1.0,
                                                        "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
             "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
             "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success"
    # executing per node, progress per step, executed, status: well over the 3 steps
    assert server.messages_received() - before >= 6
