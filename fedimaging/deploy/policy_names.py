"""Names shared by the policy builder and the command line, kept free of NVFlare imports.

The command line imports this module to build its help text, so ``fedimaging report`` and other
commands never load NVFlare.
"""

# Markers in policies/privacy.json where a filter class path is not yet known. A filter whose path
# is still a marker is left out of the kit, and provisioning reports it as missing.
PHI_GUARD_MARKER = "@PHI_GUARD_FILTER@"
DP_MARKER = "@DP_FILTER@"
MARKERS = (PHI_GUARD_MARKER, DP_MARKER)

# The classes fedimaging installs at a site (``pip install fedimaging`` brings ``fedimaging_app``).
DEFAULT_PHI_GUARD_FILTER = "fedimaging_app.phi_guard.PHIGuardFilter"
DEFAULT_DP_FILTER = "fedimaging_app.privacy.SiteDPFilter"
