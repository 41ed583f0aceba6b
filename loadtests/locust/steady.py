"""steady: a realistic mix for a soak: many viewers (some reload now and then and rejoin with
last_seq), a few operators driving sessions of their own through start/pause/resume/stop, and a
few detectors publishing into the watched sessions.

    locust -f loadtests/locust/steady.py --host http://127.0.0.1:8080
    testpulse loadtest steady --users 300 --spawn-rate 50 --run-time 10m
"""

from testpulse.devtools.scenarios import control, users

control.install(
    control.Scenario(
        name="steady",
        sessions=4,
        detectors=4,
        operators=2,
        detections_per_second=5.0,
        polling_share=0.1,
        upgrade_share=0.1,
        churn_seconds=30.0,
    )
)


class Viewer(users.ViewerUser):
    weight = 1


class Detector(users.DetectorUser):
    pass


class Operator(users.OperatorUser):
    pass


class Shape(control.ScenarioShape):
    pass
