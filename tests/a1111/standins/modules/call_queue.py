"""modules.call_queue (a1111.md "Training from a tab": wrap_gradio_gpu_call takes the global queue
lock, so training never overlaps generation; textual inversion / hypernetwork training use it).

- queue_lock: the one lock every generation and GPU job holds while it runs.
- wrap_gradio_gpu_call(func, extra_outputs): under the lock, shared.state.begin() -> func ->
  shared.state.end(); a first argument "task(...)" is taken as the job id. Wrapped by
  wrap_gradio_call.
- wrap_gradio_call: an exception is reported and answered with extra_outputs + an error <div> (so
  the LAST output must be HTML); afterwards state.interrupted / skipped / job_count are cleared; with
  add_stats, a time-taken <div> is appended to the last output (a string).
"""
import html
import threading
import time

from modules import errors, shared

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        is_task = bool(args) and isinstance(args[0], str) and args[0].startswith("task(") and args[0].endswith(")")
        id_task = args[0] if is_task else None
        with queue_lock:
            shared.state.begin(job=id_task or "(unknown)")
            try:
                res = func(*args, **kwargs)
            finally:
                shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    def f(*args, extra_outputs_array=extra_outputs, **kwargs):
        started = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            errors.report("Error completing request", exc_info=True)
            shared.state.job, shared.state.job_count = "", 0
            if extra_outputs_array is None:
                extra_outputs_array = [None, ""]
            res = list(extra_outputs_array) + [f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"]
        shared.state.skipped = shared.state.interrupted = False
        shared.state.job_count = 0
        if add_stats:
            res[-1] += f"<div class='performance'><p class='time'>Time taken: {time.perf_counter() - started:.2f}s</p></div>"
        return tuple(res)

    return f
