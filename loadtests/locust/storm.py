"""storm: many clients connect and join within seconds through the proxy, hold, then leave.

WebSocket plus a share on long-polling (and polling that upgrades). Reports connects/s,
connect and connect+join percentiles and refusals by code (connect_error code or proxy status);
a trickle of detections during the hold proves every joined client is really live.

    locust -f loadtests/locust/storm.py --host http://127.0.0.1:8080
    testpulse loadtest storm --users 1000 --spawn-rate 250 --run-time 30s
"""

from testpulse.devtools.scenarios import control, users

control.install(
    control.Scenario(
        name="storm",
        sessions=4,
        detectors=1,
        detections_per_second=5.0,
        polling_share=0.2,
        upgrade_share=0.1,
    )
)


class Viewer(users.ViewerUser):
    weight = 1


class Detector(users.DetectorUser):
    pass


class Shape(control.ScenarioShape):
    pass
