"""modules.errors: report() prints an error and goes on. The webui wraps every script hook and every
callback in try/except and only REPORTS the exception (a1111.md: callbacks and AlwaysVisible hooks);
the stand-in keeps the reports so tests can see what the host would have printed."""
import traceback

reported = []


def report(message, *, exc_info=False):
    reported.append((message, traceback.format_exc() if exc_info else ""))
    print(f"*** {message}")
