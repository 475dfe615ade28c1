"""One job lifecycle: every change of a job row (`lifecycle`), creating jobs from requests (`submit`), running one
job (`execute`), the embedded process pool (`embedded`), the Celery app and publisher (`celery_app`,
`celery_queue`), the queue protocol and factory (`protocol`, `factory`), and the per-process store
(`resources`). The Celery task (`service.worker.tasks`) only calls these."""
