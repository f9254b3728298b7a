"""Command-line parsers and handlers of ``fedimaging provision`` and ``fedimaging site check``."""

from __future__ import annotations

import sys
from pathlib import Path

from fedimaging.deploy.policy_names import DP_MARKER, PHI_GUARD_MARKER


def add_provision(subparsers) -> None:
    parser = subparsers.add_parser(
        "provision",
        help="write the NVFlare startup kits of a federation, with fedimaging's site policies",
        description="Run 'nvflare provision' on a project file (default site_configs/project.yml) and add each "
        "site's authorization and privacy policy from site_configs/policies/ to its kit. Kits are written to "
        "WORKSPACE/<project name>/prod_NN/<participant>/; distribute each one to its owner only.",
    )
    parser.add_argument("--workspace", type=Path, required=True, metavar="WORKSPACE",
                        help="provisioning folder; it keeps the root CA, so keep it private and reuse it to add kits")
    parser.add_argument("--project", type=Path, metavar="PROJECT_YML", help="NVFlare project file "
                        "(default: site_configs/project.yml)")
    parser.add_argument("--policies", type=Path, metavar="DIR",
                        help="folder with authorization.json, authorization-installed-code.json and privacy.json "
                             "(default: site_configs/policies)")
    parser.add_argument("--server-name", metavar="HOST",
                        help="server host name (FQDN) that sites connect to; overrides the project file")
    parser.add_argument("--port", type=int, metavar="PORT", help="server port for site connections (fed_learn_port)")
    parser.add_argument("--admin-port", type=int, metavar="PORT", help="server port for admin connections")
    parser.add_argument("--he", action="store_true",
                        help="add NVFlare's HE builder (TenSEAL contexts) for jobs that use homomorphic encryption")
    parser.add_argument("--phi-guard-filter", metavar="CLASS",
                        help=f"class path of the PHI guard filter that replaces {PHI_GUARD_MARKER} in privacy.json "
                             "(default: fedimaging's own; an empty value leaves the filter out)")
    parser.add_argument("--dp-filter", metavar="CLASS",
                        help=f"class path of the differential-privacy filter that replaces {DP_MARKER} in privacy.json "
                             "(default: fedimaging's own; an empty value leaves the filter out)")
    parser.set_defaults(handler=run_provision)


def run_provision(args) -> int:
    from fedimaging.deploy.provision import DEFAULT_POLICIES, DEFAULT_PROJECT, ProvisionError, provision

    try:
        result = provision(args.workspace, args.project or DEFAULT_PROJECT, policies_dir=args.policies or DEFAULT_POLICIES,
                           server_name=args.server_name, fed_learn_port=args.port, admin_port=args.admin_port,
                           he=args.he, phi_guard_filter=args.phi_guard_filter, dp_filter=args.dp_filter)
    except (ProvisionError, OSError, ValueError) as exc:
        print(f"fedimaging provision: error: {exc}", file=sys.stderr)
        return 1
    print(f"startup kits in {result.prod_dir}:")
    for name, kit in result.kits.items():
        role = result.roles.get(name)
        print(f"  {name}{f' ({role})' if role else ''}: {kit}")
    for site, markers in result.missing_filters.items():
        print(f"warning: {site}: the privacy policy has no {' or '.join(markers)} filter, because no class was given "
              "(--phi-guard-filter, --dp-filter); this kit does not enforce it", file=sys.stderr)
    print("next: give each kit to its owner only, over a secure channel; each site runs "
          "'fedimaging site check --config SITE.yaml' and then startup/start.sh")
    return 0


def add_site(subparsers) -> None:
    site = subparsers.add_parser("site", help="site operations in a real deployment")
    actions = site.add_subparsers(dest="action", required=True)
    parser = actions.add_parser(
        "check",
        help="check that this site is ready to join the federation",
        description="Check the prepared data against its manifest, the label mapping against a job, the device, "
        "the startup kit (files, certificate chain to rootCA.pem, validity dates, site name) and that the server "
        "resolves and accepts a TCP connection. Every failed check says what to do. Exit status 0 when all checks "
        "pass, 1 otherwise.",
    )
    parser.add_argument("--config", type=Path, required=True, metavar="SITE_YAML",
                        help="the site configuration (with startup_kit set to the kit folder)")
    parser.add_argument("--job", type=Path, metavar="JOB", help="job folder whose classes the label mapping must cover")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the server connection (default 3)")
    parser.set_defaults(handler=run_site_check)


def run_site_check(args) -> int:
    from fedimaging.deploy.site_check import run_checks

    results = run_checks(args.config, job=args.job, connect_timeout_s=args.timeout)
    for result in results:
        print(result.line())
    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} checks failed: {', '.join(failed)}")
        return 1
    print(f"all {len(results)} checks passed")
    return 0
