"""soak: the steady mix for hours. Detectors publish steadily, operators drive their own sessions,
viewers reload now and then and rejoin with last_seq, a third of them on long-polling (some of those
upgrading). `testpulse loadtest soak` adds the node restarts, the Redis restart and the resource
report (testpulse.devtools.soak); this file is only the load.

    testpulse loadtest soak                                   # 4 h, a restart every 10 min
    testpulse loadtest soak --run-time 1h --users 40 --database-url postgresql+asyncpg://...
"""

from testpulse.devtools.scenarios import control, users

control.install(
    control.Scenario(
        name="soak",
        run_time=4 * 3600.0,
        sessions=4,
        detectors=4,
        operators=2,
        detections_per_second=5.0,
        polling_share=0.3,
        upgrade_share=0.1,
        churn_seconds=120.0,
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
