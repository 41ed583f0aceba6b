"""reconnect: while detections flow, every viewer loses its connection at once (--fault disconnect,
the default) or one node is SIGKILLed (--fault kill-node, needs --cluster-json for the pids).

Every dropped viewer reconnects through the proxy, rejoins with last_seq and must end with every
seq exactly once. Reports time-to-recover (request type `recover`) and replayed counts.

    locust -f loadtests/locust/reconnect.py --host http://127.0.0.1:8080
    testpulse loadtest reconnect --users 200 --spawn-rate 100 --run-time 40s --fault kill-node
"""

from testpulse.devtools.scenarios import control, users

control.install(
    control.Scenario(
        name="reconnect",
        sessions=2,
        detectors=2,
        detections_per_second=20.0,
        polling_share=0.1,
        fault="disconnect",
        fault_at=0.4,
    )
)


class Viewer(users.ViewerUser):
    weight = 1


class Detector(users.DetectorUser):
    pass


class Shape(control.ScenarioShape):
    pass
