"""Real NVFlare deployments of fedimaging jobs: provisioning, site readiness checks and kit processes.

``provision`` and ``builders`` run on the machine that provisions the federation, ``site_check`` at
each site, and ``kits`` starts and stops provisioned kits as local processes (tests and trials).
"""
