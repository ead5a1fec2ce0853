#!/usr/bin/python
# -*- coding: utf-8 -*-
# Ansible module: push a configuration file to machines through the SCM hub with the
# back office (`backoffice --output json push`, schema 1, docs/operations.md).
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: scm_config
short_description: Push a configuration file to SCM hub machines through the back office
description:
  - Pushes I(src) (or I(content)) to one machine or a target (C(group:NAME), C(label:TEXT),
    C(all)) with C(backoffice --output json push) and reports C(changed=false) when the SCM
    answers that every machine already applied this content, C(changed=true) on ACK, and
    fails with the machines' NACK reasons otherwise (or when a machine is unreachable,
    the push superseded or refused).
  - In check mode nothing is pushed; the module compares the content's SHA-256 with the
    generation each machine applied (C(backoffice machines) and C(history)) and reports
    what would change. A C(label:) target cannot be resolved in check mode and is
    reported as changed.
  - Runs on the host that has the back office (usually with C(delegate_to) or a local
    connection); I(src) is a path on that host.
options:
  machine:
    description: Machine id. Exactly one of I(machine) and I(target).
    type: int
  target:
    description: A machine id, C(group:NAME), C(label:TEXT) or C(all).
    type: str
  src:
    description: The configuration file to push. Exactly one of I(src) and I(content).
    type: path
  content:
    description: The configuration text to push.
    type: str
  config:
    description: The back office's configuration file.
    type: path
    default: /etc/scm-backoffice/backoffice.toml
  backoffice:
    description: The back office binary.
    type: path
    default: backoffice
author:
  - SCM hub maintainers
"""

EXAMPLES = r"""
- name: Push the floor-2 configuration
  scm_config:
    target: group:floor2
    src: files/floor2.cfg

- name: Push machine 42's configuration
  scm_config:
    machine: 42
    src: files/m42.cfg
"""

RETURN = r"""
outcomes:
  description: One entry per machine (machine, generation, outcome, already_applied, detail).
  returned: when pushed
  type: list
  elements: dict
summary:
  description: The SCM's last reply line.
  returned: when pushed
  type: str
would_change:
  description: In check mode, the machines whose applied configuration differs.
  returned: check mode
  type: list
  elements: int
"""

import hashlib
import json
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule

SCHEMA = 1


def run_json(module, args):
    """Runs the back office with --output json; returns (exit status, document)."""
    p = module.params
    cmd = [p["backoffice"], "--config", p["config"], "--output", "json"] + args
    rc, out, err = module.run_command(cmd)
    doc = None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
    if doc is None:
        module.fail_json(
            msg="backoffice gave no JSON answer (exit %d): %s" % (rc, (err or out).strip()),
            cmd=cmd,
        )
    if doc.get("schema") != SCHEMA:
        module.fail_json(
            msg="backoffice answered JSON schema %r; this module understands schema %d: use matching versions"
            % (doc.get("schema"), SCHEMA)
        )
    if "error" in doc:
        module.fail_json(msg="backoffice failed: %s" % doc["error"], cmd=cmd)
    return rc, doc


def members(module, target):
    """Machine ids of a target, from `backoffice machines`; None when it cannot be resolved."""
    _, doc = run_json(module, ["machines"])
    rows = doc.get("machines", [])
    if target == "all":
        return [m["id"] for m in rows]
    if target.startswith("group:"):
        name = target[len("group:"):]
        return [m["id"] for m in rows if name in m.get("groups", [])]
    if target.startswith("label:"):
        return None
    try:
        return [int(target)]
    except ValueError:
        module.fail_json(msg="target %r is not a machine id, group:NAME, label:TEXT or all" % target)


def applied_sha(module, machine):
    """The SHA-256 prefix of the generation the machine applied, or None."""
    _, doc = run_json(module, ["machines"])
    applied = None
    for m in doc.get("machines", []):
        if m["id"] == machine:
            applied = m.get("applied_generation")
    if not applied:
        return None
    _, hist = run_json(module, ["history", str(machine)])
    for g in hist.get("generations", []):
        if g.get("generation") == applied:
            return g.get("sha256")
    return None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            machine=dict(type="int"),
            target=dict(type="str"),
            src=dict(type="path"),
            content=dict(type="str"),
            config=dict(type="path", default="/etc/scm-backoffice/backoffice.toml"),
            backoffice=dict(type="path", default="backoffice"),
        ),
        required_one_of=[("machine", "target"), ("src", "content")],
        mutually_exclusive=[("machine", "target"), ("src", "content")],
        supports_check_mode=True,
    )
    p = module.params
    target = str(p["machine"]) if p["machine"] is not None else p["target"]
    if p["src"] is not None:
        try:
            with open(p["src"], "rb") as f:
                data = f.read()
        except (IOError, OSError) as e:
            module.fail_json(msg="cannot read src %s: %s" % (p["src"], e))
    else:
        data = p["content"].encode("utf-8")
    sha = hashlib.sha256(data).hexdigest()

    if module.check_mode:
        ids = members(module, target)
        if ids is None:
            module.exit_json(changed=True, msg="%s cannot be resolved in check mode; assuming it changes" % target)
        would = []
        for m in ids:
            have = applied_sha(module, m)
            if not have or not sha.startswith(have):
                would.append(m)
        module.exit_json(changed=bool(would), would_change=would, target=target)

    path = p["src"]
    tmp = None
    if path is None:
        fd, tmp = tempfile.mkstemp(prefix="scm_config.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        path = tmp
    try:
        rc, doc = run_json(module, ["push", "--target", target, "--file", path])
    finally:
        if tmp:
            os.unlink(tmp)
    outcomes = doc.get("outcomes", [])
    summary = doc.get("summary", "")
    if rc == 0 and doc.get("ok"):
        changed = any(not o.get("already_applied") for o in outcomes)
        module.exit_json(changed=changed, outcomes=outcomes, summary=summary, target=target)
    nacks = ["machine %s NACK: %s" % (o["machine"], o["detail"]) for o in outcomes if o["outcome"] == "nack"]
    others = ["machine %s %s: %s" % (o["machine"], o["outcome"], o["detail"]) for o in outcomes if o["outcome"] not in ("ack", "nack")]
    reasons = nacks + others
    changed = any(o["outcome"] == "ack" and not o.get("already_applied") for o in outcomes)
    msg = "; ".join(reasons) if reasons else "the SCM refused the push: %s" % summary
    module.fail_json(msg=msg, changed=changed, outcomes=outcomes, summary=summary, target=target, rc=rc)


if __name__ == "__main__":
    main()
