"""The project's examples, adapted to the bed: pointed at the local OAuth server, its CA and the
local IMAP/SMTP ports. Used by the end-to-end tests and by the demo."""
import copy

import yaml

from bed import ROOT


def example(name, kind):
    docs = yaml.safe_load_all((ROOT / "examples" / name).read_text())
    return copy.deepcopy(next(d for d in docs if d and d["kind"] == kind))


def secret(namespace, name, data, referable=True):
    """A Secret; `referable` labels it for the operator, as strict mode (the chart's default, and
    the bed's) requires of every Secret a MailProvider or MailboxBinding names."""
    meta = {"name": name, "namespace": namespace}
    if referable:
        meta["labels"] = {"mailoauth.io/allow-reference": "true"}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "stringData": data}


def provider(bed, namespace, name, client_id, secret_name):
    """examples/generic-provider.yaml's MailProvider for the bed's OAuth server."""
    p = example("generic-provider.yaml", "MailProvider")
    p["metadata"].update(name=name, namespace=namespace)
    g = p["spec"]["generic"]
    g["issuerUrl"] = bed.issuer
    g["caBundle"] = (bed.dir / "ca.crt").read_text()
    # The bed's Dovecot and Postfix speak without TLS on loopback (allowPrivateEndpoints).
    g["servers"] = {"imap": {"host": "127.0.0.1", "port": bed.ports["imap"], "tls": "none"}}
    if "submission" in bed.ports:
        g["servers"]["smtp"] = {"host": "127.0.0.1", "port": bed.ports["submission"], "tls": "none"}
    p["spec"]["clientId"] = client_id
    p["spec"]["clientAuthentication"] = {"clientSecretRefs": [{"name": secret_name, "key": "client-secret"}]}
    return p


def binding(namespace, name, provider_name, mailbox, seed_secret, smtp=True):
    """examples/refresh-token-import.yaml's MailboxBinding for a seeded refresh token. Its
    template names smtp_host, so it is dropped when the bed has no SMTP server."""
    b = example("refresh-token-import.yaml", "MailboxBinding")
    if not smtp:
        b["spec"].pop("secretTemplate", None)
    b["metadata"] = {"name": name, "namespace": namespace}
    b["spec"]["providerRef"] = {"name": provider_name}
    b["spec"]["mailbox"] = mailbox
    b["spec"]["grant"]["refreshToken"]["secretRef"]["name"] = seed_secret
    b["spec"]["secretName"] = f"{name}-mail-token"
    return b


def apply(bed, *docs):
    bed.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


def device_binding(bed, namespace, name, provider_name, mailbox):
    """examples/device-code.yaml's MailboxBinding for the bed (IMAP, the bed's provider)."""
    b = example("device-code.yaml", "MailboxBinding")
    b["metadata"] = {"name": name, "namespace": namespace}
    b["spec"].update(providerRef={"name": provider_name}, mailbox=mailbox, protocols=["imap"],
                     secretName=f"{name}-mail-token")
    return b


def public_provider(bed, namespace, name, client_id):
    """A public client (no clientAuthentication) on the bed's OAuth server, as
    examples/device-code.yaml registers one with Microsoft."""
    p = provider(bed, namespace, name, client_id, "unused")
    del p["spec"]["clientAuthentication"]
    return p


def relay_binding(bed, namespace, name, mailbox, **relay):
    """A MailboxBinding with spec.relay enabled (and `relay` settings) for a refresh token the
    bed's OAuth server seeds for `mailbox`, and that token's Secret; returns (documents, token)."""
    seed = bed.oauth("/test/seed", {"accountId": mailbox})["refresh_token"]
    b = binding(namespace, name, "idp", mailbox, f"{name}-refresh-token", smtp="submission" in bed.ports)
    b["spec"]["relay"] = {"enabled": True, **relay}
    return [secret(namespace, f"{name}-refresh-token", {"refresh_token": seed}), b], seed
