"""A stepped load for finding the saturation point: add with
`locust -f loadtests/locustfile.py,loadtests/step_shape.py --headless ...`.

Every STEP_SECONDS (default 20) it adds STEP_USERS users (default 8), up to
MAX_USERS (default 64), then holds the last step once and stops: every run is bounded.
"""

from __future__ import annotations

import os

from locust import LoadTestShape


class StepLoadShape(LoadTestShape):
    step_seconds = int(os.environ.get("STEP_SECONDS", "20"))
    step_users = int(os.environ.get("STEP_USERS", "8"))
    max_users = int(os.environ.get("MAX_USERS", "64"))

    def tick(self) -> tuple[int, float] | None:
        steps = self.max_users // self.step_users
        elapsed = self.get_run_time()
        if elapsed >= self.step_seconds * (steps + 1):
            return None
        users = min(self.max_users, self.step_users * (int(elapsed // self.step_seconds) + 1))
        return users, float(self.step_users)
