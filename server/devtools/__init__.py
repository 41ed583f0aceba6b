"""Tools for a developer's machine, apart from what a production node imports: the local no-Docker
cluster (`testpulse cluster`), its Redis Cluster, and the Locust load-test runner (`testpulse loadtest`)
with its scenarios. Nothing under testpulse.devtools is imported by a node that serves traffic."""
