"""fanout: a few detectors publish into sessions that many viewers watch on every node; zero loss.

Measures delivery (now - detection ts, as request type `delivery`) and its rate; every viewer must
see every seq of its session exactly once.

    locust -f loadtests/locust/fanout.py --host http://127.0.0.1:8080            # web UI
    testpulse loadtest fanout --users 200 --spawn-rate 50 --run-time 60s          # headless, own cluster
"""

from testpulse.devtools.scenarios import control, users

control.install(control.Scenario(name="fanout", sessions=2, detectors=2, detections_per_second=20.0, polling_share=0.1))


class Viewer(users.ViewerUser):
    weight = 1


class Detector(users.DetectorUser):
    pass


class Shape(control.ScenarioShape):
    pass
