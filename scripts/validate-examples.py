#!/usr/bin/env python3
"""Validates every document in examples/ : custom resources against the openAPIV3Schema of the
CRDs in crds/, built-in kinds with kubernetes-validate --strict. Then checks that the schemas
reject what they must (two presets, two grants, a bad mailbox, a bad duration, a plain-http
issuer), so that a schema that accepts everything cannot pass."""
import copy
import glob
import os
import subprocess
import sys
import tempfile

import jsonschema
import yaml

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
schemas = {}
for path in glob.glob(os.path.join(root, "crds", "*.yaml")):
    crd = yaml.safe_load(open(path))
    for v in crd["spec"]["versions"]:
        key = (f'{crd["spec"]["group"]}/{v["name"]}', crd["spec"]["names"]["kind"])
        schemas[key] = v["schema"]["openAPIV3Schema"]


def errors(doc):
    schema = schemas[(doc["apiVersion"], doc["kind"])]
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


failures = 0
builtin = []
count = 0
for path in sorted(glob.glob(os.path.join(root, "examples", "*.yaml"))):
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        count += 1
        name = f'{os.path.basename(path)}: {doc["kind"]} {doc["metadata"]["name"]}'
        if (doc["apiVersion"], doc["kind"]) in schemas:
            errs = errors(doc)
            if errs:
                failures += 1
                print(f"FAIL {name}: {errs}")
            else:
                print(f"ok   {name}")
        else:
            builtin.append(doc)

if builtin:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(builtin, f)
    result = subprocess.run(["kubernetes-validate", "--strict", "--quiet", f.name])
    if result.returncode != 0:
        failures += 1
        print(f"FAIL kubernetes-validate on {len(builtin)} built-in documents")
    else:
        print(f"ok   {len(builtin)} built-in documents (kubernetes-validate --strict)")

binding = {
    "apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding", "metadata": {"name": "x"},
    "spec": {"providerRef": {"name": "p"}, "mailbox": "a@example.com", "grant": {"clientCredentials": {}},
             "secretName": "a-token"},
}
provider = {
    "apiVersion": "mailoauth.io/v1alpha1", "kind": "MailProvider", "metadata": {"name": "p"},
    "spec": {"google": {}, "clientId": "c"},
}
assert not errors(binding) and not errors(provider), "the base documents must be valid"


def mutated(base, change):
    doc = copy.deepcopy(base)
    change(doc["spec"])
    return doc


must_reject = {
    "a provider with two presets": mutated(provider, lambda s: s.update(microsoft={"tenant": "x"})),
    "a provider with no preset": mutated(provider, lambda s: s.pop("google")),
    "a plain-http issuer": mutated(provider, lambda s: (s.pop("google"), s.update(generic={"issuerUrl": "http://idp"}))),
    "a binding with two grants": mutated(binding, lambda s: s["grant"].update(deviceCode={})),
    "a binding with no grant": mutated(binding, lambda s: s.update(grant={})),
    "a mailbox that is not an address": mutated(binding, lambda s: s.update(mailbox="helpdesk")),
    "a duration that does not parse": mutated(binding, lambda s: s.update(refreshBefore="ten minutes")),
    "an unknown protocol": mutated(binding, lambda s: s.update(protocols=["nntp"])),
    "an invalid Secret name": mutated(binding, lambda s: s.update(secretName="Not_A_Name")),
}
for what, doc in must_reject.items():
    if errors(doc):
        print(f"ok   rejects {what}")
    else:
        failures += 1
        print(f"FAIL accepts {what}")

print(f"{count} example documents, {len(must_reject)} rejections checked, {failures} failures")
sys.exit(1 if failures else 0)
