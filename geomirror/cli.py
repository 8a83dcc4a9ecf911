"""The `geomirror` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import uvloop

from geomirror import config, netns, pairing, witness
from geomirror import logging as gmlog
from geomirror.config import load_site, load_witness
from geomirror.disk_image import build_disk_image
from geomirror.image import build_image
from geomirror.site.daemon import SiteDaemon
from geomirror.site.rejoin import rejoin
from geomirror.control import ControlClient, ControlError
from geomirror.drill import report as drill_report
from geomirror.drill.checks import Limits
from geomirror.drill.probes import Probe, ProbeSpec
from geomirror.drill.runner import DrillOptions, exit_code, run_and_keep, where_kept
from geomirror.errors import GeomirrorError
from geomirror.plugins import PLUGIN_GROUP, Extensions, SiteEndpoint, load_extensions


def _loop_run(coro):
    return uvloop.run(coro)


# ---------------------------------------------------------------- commands

def cmd_daemon(args) -> int:
    cfg = load_site(args.config)
    _loop_run(SiteDaemon(cfg).run())
    return 0


def cmd_witness(args) -> int:
    cfg = load_witness(args.config)
    if hasattr(cfg, "check_files"):
        cfg.check_files()
    ident = pairing.TlsIdentity(cfg.tls.ca, cfg.tls.cert, cfg.tls.key, cfg.witness.name,
                                scratch_dir=Path(cfg.witness.state_dir))
    allowed = set(cfg.witness.sites) if getattr(cfg.witness, "sites", None) else None
    _loop_run(witness.serve_witness(Path(cfg.witness.state_dir), str(cfg.witness.listen), cfg.witness.port,
                                    ident.server, allowed, identity=ident))
    return 0


def cmd_config_check(args) -> int:
    print(config.check(args.file, files=args.files))
    return 0


def cmd_guest_build(args) -> int:
    cache = Path(args.cache_dir) if args.cache_dir else None
    img = build_disk_image(cache, force=args.force) if args.disk else build_image(cache, force=args.force)
    print(f"kernel  {img.kernel}\ninitrd  {img.initrd}\nversion {img.kernel_version}\nkey     {img.key}")
    if img.disk is not None:
        print(f"disk    {img.disk}  (read-only: boot a copy, e.g. cp --sparse=always)")
    return 0


def cmd_pair_init(args) -> int:
    files = pairing.create_pair(Path(args.out), args.site, args.witness or ["witness"], force=args.force)
    print(pairing.copy_instructions(files))
    return 0


def cmd_pair_issue(args) -> int:
    out = pairing.issue_cert(Path(args.ca_dir), args.name, Path(args.out or args.ca_dir))
    print(f"issued a new certificate for {args.name}: {out}")
    return 0


class _SiteOption(argparse.Action):
    """--<source> NAME: remembers NAME and the plugin's resolver for it."""

    def __init__(self, *args, resolve: Callable[[str], SiteEndpoint], **kw):
        super().__init__(*args, **kw)
        self.resolve = resolve

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.site = value
        namespace.site_resolve = self.resolve


def _site_endpoint(args) -> SiteEndpoint:
    if args.config:
        cfg = load_site(args.config)
        tok = Path(cfg.control.token_file)
        tok = tok if tok.is_absolute() else Path(cfg.site.state_dir) / tok
        return SiteEndpoint(cfg.site.name, Path(cfg.site.run_dir) / "control.sock", tok)
    return args.site_resolve(args.site)


def _site_client(args) -> ControlClient:
    ep = _site_endpoint(args)
    tok = ep.token_file
    try:
        token = tok.read_text().strip()
    except FileNotFoundError:
        raise ControlError(f"no control token at {tok}: is {ep.name}'s daemon running?") from None
    except PermissionError:
        raise ControlError(f"cannot read the control token {tok}: it is readable only by the service's "
                           "user (root); run this as root") from None
    except OSError as e:
        raise ControlError(f"cannot read the control token {tok}: {e.strerror}") from None
    return ControlClient(token, ep.socket, name=f"{ep.name}'s daemon")


def cmd_promote(args) -> int:
    r = _loop_run(_site_client(args).call("POST", "/v1/promote", {"force": args.force}, timeout=120))
    print(json.dumps(r, indent=2))
    return 0


def cmd_fence(args) -> int:
    r = _loop_run(_site_client(args).call("POST", "/v1/fence", {"reason": "operator"}))
    print(json.dumps(r, indent=2))
    return 0


def cmd_rejoin(args) -> int:
    print(rejoin(load_site(args.config), seed=not args.no_seed))
    return 0


def cmd_switchover(args) -> int:
    r = _loop_run(_site_client(args).call("POST", "/v1/switchover", {"timeout_s": args.timeout},
                                          timeout=args.timeout + 60))
    print(f"the guest moved from {r['from']} to {r['to']} at epoch {r['final_epoch']}: paused after "
          f"{r['paused_at_ms']} ms, {r['to']} held the lease at {r['peer_holds_lease_at_ms']} ms, "
          f"{r['from']} is its standby since {r['standby_at_ms']} ms")
    return 0


def _peer_client(cfg) -> ControlClient:
    d = cfg.drill
    if not d.peer_control:
        raise ControlError(f"a drill needs {cfg.peer.name}'s control API too: set drill.peer_control and "
                           f"drill.peer_token_file in {cfg.path}")
    try:
        token = d.peer_token_file.read_text().strip()
    except OSError as e:
        raise ControlError(f"cannot read {cfg.peer.name}'s control token {d.peer_token_file}: {e.strerror}") from None
    return ControlClient(token, None, base=d.peer_control, name=f"{cfg.peer.name}'s daemon")


def cmd_drill(args) -> int:
    cfg = load_site(args.config)
    peer = _peer_client(cfg) if args.action == "run" else None  # a missing [drill] peer is said first
    local = _site_client(args)
    if args.action == "list":
        r = _loop_run(local.call("GET", "/v1/drills"))
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            for d in r["drills"]:
                print(f"{d['id']}  {str(d['verdict']):11}  {' '.join(d.get('moves') or []) or '-':28} {d['reason']}")
            if r.get("running"):
                print(f"running now: {r['running']['id']} (started by {r['running']['by']})")
        return 0
    d = cfg.drill
    opts = DrillOptions(there_and_back=d.there_and_back if args.there_and_back is None else args.there_and_back,
                        budgets_ms=drill_report.parse_budgets(d.budgets_ms(), args.budget),
                        limits=Limits(d.max_backlog_epochs, d.max_replica_lag_epochs),
                        switchover_timeout_s=d.switchover_timeout_s, rollback_timeout_s=d.rollback_timeout_s,
                        unattended=args.unattended, local=cfg.site.name,
                        initiated_by="timer" if args.unattended else "operator")
    sites = {cfg.site.name: local, cfg.peer.name: peer}
    probes = [Probe(ProbeSpec(p.name, p.kind, p.address, p.port, p.interval_ms, p.timeout_ms, p.max_stall_ms))
              for p in d.probes]
    report, kept = _loop_run(run_and_keep(sites, opts, probes))
    print(json.dumps(report, indent=2) if args.json else drill_report.text(report) + "\n" + where_kept(kept))
    return exit_code(report)


def cmd_reload_tls(args) -> int:
    r = _loop_run(_site_client(args).call("POST", "/v1/reload-tls"))
    print(f"{r['name']} now presents certificate serial {r['serial']} (was {r['previous_serial']}), "
          f"valid until {r['not_after']}")
    return 0


def cmd_status(args) -> int:
    r = _loop_run(_site_client(args).call("GET", "/v1/status"))
    print(json.dumps(r, indent=2))
    return 0


# ---------------------------------------------------------------- parser

def build_parser(ext: Extensions | None = None) -> argparse.ArgumentParser:
    ext = ext or Extensions()
    p = argparse.ArgumentParser(prog="geomirror", description=__doc__)
    p.add_argument("--netns", help="run inside this network namespace")
    p.add_argument("--log-level", default=None)
    p.add_argument("--log-json", action="store_true", help="JSON log lines even on a terminal")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("daemon", help="run a site's service")
    d.add_argument("--config", required=True)
    d.set_defaults(func=cmd_daemon)

    w = sub.add_parser("witness", help="run the witness (lease service)")
    w.add_argument("--config", required=True)
    w.set_defaults(func=cmd_witness)

    cc = sub.add_parser("config", help="configuration").add_subparsers(dest="config_cmd", required=True)
    ck = cc.add_parser("check", help="validate a site or witness config file")
    ck.add_argument("file")
    ck.add_argument("--files", action="store_true", help="also check the TLS files it names")
    ck.set_defaults(func=cmd_config_check)

    g = sub.add_parser("guest", help="the guest image").add_subparsers(dest="guest_cmd", required=True)
    gb = g.add_parser("build", help="build (or reuse) the guest kernel + initramfs")
    gb.add_argument("--cache-dir")
    gb.add_argument("--force", action="store_true")
    gb.add_argument("--disk", action="store_true",
                    help="the disk guest: a boot initramfs and a raw ext4 root disk (Debian minbase, mmdebstrap)")
    gb.set_defaults(func=cmd_guest_build)

    pr = sub.add_parser("pair", help="pairing: CA and certificates").add_subparsers(dest="pair_cmd", required=True)
    pi = pr.add_parser("init", help="create a pair CA and a certificate per site and witness")
    pi.add_argument("--out", required=True)
    pi.add_argument("--site", action="append", required=True, help="site name (twice)")
    pi.add_argument("--witness", action="append")
    pi.add_argument("--force", action="store_true")
    pi.set_defaults(func=cmd_pair_init)
    pis = pr.add_parser("issue", help="issue a new certificate (rotation) under an existing pair CA")
    pis.add_argument("--ca-dir", required=True)
    pis.add_argument("--name", required=True)
    pis.add_argument("--out")
    pis.set_defaults(func=cmd_pair_issue)

    for name, fn, helptext in (("promote", cmd_promote, "take over the guest at this (standby) site"),
                               ("fence", cmd_fence, "stop this site releasing output or announcing"),
                               ("status", cmd_status, "a site's status"),
                               ("switchover", cmd_switchover,
                                "planned move of the guest to the peer, losing nothing (run at the primary)"),
                               ("reload-tls", cmd_reload_tls,
                                "take up a rotated certificate now (it is also picked up within 5 s)")):
        c = sub.add_parser(name, help=helptext)
        src = c.add_mutually_exclusive_group(required=True)
        src.add_argument("--config", help="the site's config file")
        for source in ext.site_sources:
            src.add_argument(source.option, dest="site", choices=source.choices, help=source.help,
                             action=_SiteOption, resolve=source.resolve)
        if name == "switchover":
            c.add_argument("--timeout", type=float, default=15.0,
                           help="seconds the peer has to take over before the guest runs on here")
        if name == "promote":
            c.add_argument("--force", action="store_true",
                           help="take over even without a lease from the witness (the primary must be known dead)")
        c.set_defaults(func=fn)

    dr = sub.add_parser("drill", help="a site-evacuation drill: pre-flight, a timed switchover (there and back), "
                                      "a report; `drill list`: the reports kept at this site")
    dr.add_argument("action", nargs="?", choices=["run", "list"], default="run")
    dr.add_argument("--config", required=True, help="this site's config file ([drill] names the peer's control API)")
    dr.add_argument("--there-and-back", action=argparse.BooleanOptionalAction, default=None,
                    help="move the guest back afterwards (default: drill.there_and_back)")
    dr.add_argument("--budget", action="append", metavar="STEP=MS",
                    help="override a step's budget, e.g. route_moved=5000 (steps: " + ", ".join(drill_report.STEPS) + ")")
    dr.add_argument("--unattended", action="store_true",
                    help="from the timer: skip (logged, exit 0) when the pair is not healthy or the guest runs elsewhere")
    dr.add_argument("--json", action="store_true", help="print the report as JSON")
    dr.set_defaults(func=cmd_drill)

    rj = sub.add_parser("rejoin", help="after a takeover: make this (stopped) site start as the standby of its "
                                       "peer, seeded from its last copy of the guest's RAM")
    rj.add_argument("--config", required=True, help="the site's config file")
    rj.add_argument("--no-seed", action="store_true", help="discard the old RAM image: full initial sync")
    rj.set_defaults(func=cmd_rejoin)

    for add in ext.commands:
        add(sub)
    return p


_ROOT_REASONS = {
    "daemon": "the site daemon needs root: it creates the guest's TAP device and runs ExaBGP",
    "rejoin": "rejoin needs root: a site's state is readable only by its service",
    "drill": "a drill needs root: the control tokens are readable only by the service",
}


def _root_refusal(args) -> str | None:
    """One sentence when this command cannot work without root, before it touches anything."""
    if os.geteuid() == 0:
        return None
    if args.netns:
        return f"--netns {args.netns} needs root: only root can enter a network namespace; run it as root"
    reason = getattr(args, "needs_root", None) or _ROOT_REASONS.get(args.cmd)
    return f"{reason}; run it as root" if reason else None


def main(argv: list[str] | None = None, extensions: Extensions | None = None) -> int:
    ext = load_extensions() if extensions is None else extensions
    args = build_parser(ext).parse_args(argv)
    gmlog.setup(level=args.log_level, json=True if args.log_json else None)
    for name, why in ext.unavailable:
        gmlog.get(__name__).warning("cli.plugin_unavailable", entry_point=name, group=PLUGIN_GROUP, error=why)
    refusal = _root_refusal(args)
    if refusal:
        print(f"geomirror: {refusal}", file=sys.stderr)
        return 2
    try:
        if args.netns:
            netns.enter(args.netns)
        return args.func(args) or 0
    except GeomirrorError as e:
        print(f"geomirror: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
