"""A small fake mail server for the bed: SMTP submission, IMAP and POP3 listeners on 127.0.0.1 that
answer an XOAUTH2 login as a configured server would (Exchange Online's exact texts, or a hostile
server's behaviour), and record every SASL response they were sent and whether it came under TLS.

It checks no token: what it answers is what its listener was told to answer. Python's asyncio and
ssl only; it runs on its own event loop in a daemon thread of the test process.

    fake = FakeMail()
    port = fake.listen("smtp", tls="starttls", cert=(crt, key), answer=SMTP_TENANT_DISABLED)
    ...
    assert not fake.plaintext_logins()
    fake.stop()

A listener's `mode`:
  "answer"          the protocol up to the login, which gets `answer` (None: accepted); then, for
                    SMTP, mail is accepted and recorded (`messages`); then logout
  "not-connected"   IMAP: the login is accepted, the next command gets
                    "BAD User is authenticated but not connected." (Exchange with IMAP off)
  "silent"          accepts the connection and never writes
  "endless"         the greeting is one line that never ends (`size` bytes, default 100 MB)
  "no-starttls"     STARTTLS/STLS is not offered (AUTH is, in clear: a client that goes on sends
                    its token in clear, and that is recorded)
  "starttls-refused" STARTTLS/STLS is offered and answered with an error (AUTH offered in clear)
  "short-lines"     as "answer", but a command line longer than SHORT_LINE bytes is refused
                    (SMTP `500 5.5.2 Line too long`, IMAP `BAD`, POP3 `-ERR`) as some servers cut
                    or refuse long first lines: a long token passes only as a SASL continuation
"""
import asyncio
import base64
import ssl
import threading
import time
from dataclasses import dataclass, field

# Exchange Online's answers, as its clients see them.
SMTP_TENANT_DISABLED = ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
                        "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. "
                        "[SN4PR0501CA0056.namprd05.prod.outlook.com]")
SMTP_MAILBOX_DISABLED = ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
                         "Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information. "
                         "[AM0PR02CA0001.eurprd02.prod.outlook.com]")
IMAP_AUTHENTICATE_FAILED = "NO AUTHENTICATE failed."
IMAP_NOT_CONNECTED = "BAD User is authenticated but not connected."
POP3_AUTHENTICATION_FAILURE = "-ERR Authentication failure: unknown user name or bad password."

MODES = {"answer", "not-connected", "silent", "endless", "no-starttls", "starttls-refused", "short-lines"}
MAX_LINE = 64 * 1024  # a client's line longer than this ends the connection
SHORT_LINE = 1024  # "short-lines": the longest command line accepted


@dataclass
class Login:
    """One SASL response the fake was sent: where, whether under TLS, and who it named (the
    XOAUTH2 `user=`; the token itself is not kept)."""
    listener: str
    tls: bool
    user: str
    continuation: bool = True  # sent alone after the server's challenge (not with the command)
    size: int = 0  # bytes of the (base64) response
    at: float = field(default_factory=time.monotonic)


@dataclass
class Message:
    """A message an SMTP listener accepted after a login: envelope and content (dot-unstuffed)."""
    listener: str
    mail_from: str
    rcpt_to: list
    data: str


@dataclass
class Listener:
    name: str
    protocol: str
    tls: str
    mode: str
    answer: str | None
    context: ssl.SSLContext | None
    size: int
    port: int = 0
    connections: int = 0
    sent: int = 0  # bytes written by "endless"
    longest_command: int = 0  # the longest command line (not SASL response) received
    refused_long: int = 0  # command lines refused by "short-lines"
    server: asyncio.AbstractServer | None = field(default=None, repr=False)


def sasl_user(response):
    """The `user=` of an XOAUTH2 (or `a=` of an OAUTHBEARER) response, or "?"."""
    try:
        text = base64.b64decode(response, validate=True).decode(errors="replace")
    except ValueError:
        return "?"
    for part in text.replace(",", "\x01").split("\x01"):
        if part.startswith("user="):
            return part[5:]
        if part.startswith("a="):
            return part[2:]
    return "?"


class Session:
    """One connection: the stream, whether it is under TLS, and the listener's settings."""

    def __init__(self, fake, listener, reader, writer):
        self.fake, self.l, self.reader, self.writer = fake, listener, reader, writer
        self.secure = listener.tls == "implicit"  # from the first byte (see run)

    async def send(self, *lines):
        self.writer.write("".join(f"{line}\r\n" for line in lines).encode())
        await self.writer.drain()

    async def line(self):
        """The next line without its end; None when the client closed."""
        data = await self.reader.readline()
        return data.decode(errors="replace").rstrip("\r\n") if data else None

    def offers_starttls(self):
        return not self.secure and self.l.tls == "starttls" and self.l.mode != "no-starttls"

    def offers_auth(self):
        # Exchange offers AUTH only under TLS; the downgrade modes offer it in clear as bait.
        return self.secure or self.l.tls == "none" or self.l.mode in ("no-starttls", "starttls-refused")

    async def starttls(self, yes, no):
        """Answers STARTTLS: `no` when refused (or not offered), else `yes` and the handshake."""
        if self.secure or not self.offers_starttls() or self.l.mode == "starttls-refused":
            await self.send(no)
            return
        await self.send(yes)
        await self.writer.start_tls(self.l.context)
        self.secure = True

    async def sasl(self, initial):
        """The client's SASL response (after a `+ ` challenge unless it came with the command),
        recorded; None when the client went away."""
        response = initial
        if response is None:
            await self.send(self.challenge)
            response = await self.line()
            if response is None:
                return None
        self.fake.record(Login(self.l.name, self.secure, sasl_user(response), initial is None, len(response)))
        return response

    async def command(self, refusal):
        """The next command line (None when the client closed); with "short-lines", a line longer
        than SHORT_LINE is answered with `refusal(line)` and skipped."""
        while (line := await self.line()) is not None:
            self.l.longest_command = max(self.l.longest_command, len(line))
            if self.l.mode != "short-lines" or len(line) <= SHORT_LINE:
                return line
            self.l.refused_long += 1
            await self.send(refusal(line))
        return None

    # ---------- SMTP ----------
    challenge = "+ "

    async def smtp(self):
        self.challenge = "334 "
        logged_in, envelope = False, None
        await self.send("220 fake.outlook.test Microsoft ESMTP MAIL Service ready")
        while (line := await self.command(lambda _: "500 5.5.2 Line too long")) is not None:
            verb, _, rest = line.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                ext = ["250-fake.outlook.test Hello [127.0.0.1]", "250-SIZE 157286400", "250-8BITMIME"]
                if self.offers_starttls():
                    ext.append("250-STARTTLS")
                if self.offers_auth():
                    ext.append("250-AUTH LOGIN XOAUTH2")
                ext.append("250 SMTPUTF8")
                await self.send(*ext)
            elif verb == "STARTTLS":
                await self.starttls("220 2.0.0 SMTP server ready", "454 4.7.0 TLS not available")
            elif verb == "AUTH":
                mechanism, _, initial = rest.partition(" ")
                if not self.offers_auth():
                    await self.send("504 5.7.4 Unrecognized authentication type")
                    continue
                if await self.sasl(initial or None) is None:
                    return
                logged_in = not self.l.answer
                await self.send(self.l.answer or "235 2.7.0 Authentication successful")
            elif verb == "QUIT":
                await self.send("221 2.0.0 Service closing transmission channel")
                return
            elif verb in ("MAIL", "RCPT", "DATA") and not logged_in:
                await self.send("530 5.7.57 Client not authenticated to send mail.")
            elif verb == "MAIL":
                envelope = {"from": rest.partition(":")[2].strip().split(" ")[0], "to": []}
                await self.send("250 2.1.0 Sender OK")
            elif verb == "RCPT" and envelope is not None:
                envelope["to"].append(rest.partition(":")[2].strip().split(" ")[0])
                await self.send("250 2.1.5 Recipient OK")
            elif verb == "DATA" and envelope and envelope["to"]:
                await self.send("354 Start mail input; end with <CRLF>.<CRLF>")
                body = []
                while (data := await self.line()) is not None and data != ".":
                    body.append(data[1:] if data.startswith(".") else data)
                if data is None:
                    return
                self.fake.record_message(Message(self.l.name, envelope["from"], envelope["to"], "\r\n".join(body)))
                envelope = None
                await self.send("250 2.6.0 Queued mail for delivery")
            elif verb in ("RSET", "NOOP"):
                envelope = None if verb == "RSET" else envelope
                await self.send("250 2.0.0 OK")
            else:
                await self.send("502 5.3.3 Command not implemented")

    # ---------- IMAP ----------
    async def imap(self):
        await self.send("* OK The Microsoft Exchange IMAP4 service is ready. [RkFLRTAxLm91dGxvb2sudGVzdA==]")
        logged_in = False
        while (line := await self.command(lambda line: f"{line.partition(' ')[0]} BAD Line too long")) is not None:
            tag, _, rest = line.partition(" ")
            command, _, args = rest.partition(" ")
            command = command.upper()
            if command == "LOGOUT":
                await self.send("* BYE Microsoft Exchange Server IMAP4 server signing off.", f"{tag} OK LOGOUT completed.")
                return
            if logged_in and self.l.mode == "not-connected":
                await self.send(f"{tag} {IMAP_NOT_CONNECTED}")
            elif command == "CAPABILITY":
                caps = "IMAP4 IMAP4rev1 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+"
                if self.offers_starttls():
                    caps += " STARTTLS"
                if self.offers_auth():
                    caps += " AUTH=PLAIN AUTH=XOAUTH2"
                await self.send(f"* CAPABILITY {caps}", f"{tag} OK CAPABILITY completed.")
            elif command == "STARTTLS":
                await self.starttls(f"{tag} OK Begin TLS negotiation now.", f"{tag} BAD Command received in Invalid state.")
            elif command == "AUTHENTICATE":
                mechanism, _, initial = args.partition(" ")
                if not self.offers_auth():
                    await self.send(f"{tag} BAD Command received in Invalid state.")
                    continue
                if await self.sasl(initial or None) is None:
                    return
                if self.l.answer:
                    await self.send(f"{tag} {self.l.answer}")
                else:
                    logged_in = True
                    await self.send(f"{tag} OK AUTHENTICATE completed.")
            elif command == "LIST" and logged_in:
                await self.send('* LIST (\\Noselect) "/" ""', f"{tag} OK LIST completed.")
            else:
                await self.send(f"{tag} BAD Command Error. 10")

    # ---------- POP3 ----------
    async def pop3(self):
        await self.send("+OK The Microsoft Exchange POP3 service is ready. [RkFLRTAxLm91dGxvb2sudGVzdA==]")
        while (line := await self.command(lambda _: "-ERR Line too long")) is not None:
            verb, _, rest = line.partition(" ")
            verb = verb.upper()
            if verb == "CAPA":
                caps = ["+OK", "TOP", "UIDL", "USER"]
                if self.offers_starttls():
                    caps.append("STLS")
                if self.offers_auth():
                    caps.append("SASL PLAIN XOAUTH2")
                await self.send(*caps, ".")
            elif verb == "STLS":
                await self.starttls("+OK Begin TLS negotiation.", "-ERR Command is not valid in this state.")
            elif verb == "AUTH":
                mechanism, _, initial = rest.partition(" ")
                if not self.offers_auth():
                    await self.send("-ERR Command is not valid in this state.")
                    continue
                if await self.sasl(initial or None) is None:
                    return
                await self.send(self.l.answer or "+OK User successfully authenticated.")
            elif verb == "QUIT":
                await self.send("+OK Microsoft Exchange Server POP3 server signing off.")
                return
            else:
                await self.send("-ERR Protocol error. 14")

    async def run(self):
        mode = self.l.mode
        if self.l.tls == "implicit":
            # Here rather than in the listener: a connection whose handshake fails is counted.
            await self.writer.start_tls(self.l.context)
        if mode == "silent":
            # Read (and drop) whatever comes until the client gives up.
            while await self.reader.read(4096):
                pass
            return
        if mode == "endless":
            chunk = b"*" * 65536
            while self.l.sent < self.l.size:
                self.writer.write(chunk)
                await self.writer.drain()
                self.l.sent += len(chunk)
            return
        await getattr(self, self.l.protocol)()


class FakeMail:
    """The listeners, their event loop (a daemon thread) and what they recorded."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.listeners = {}
        self.logins = []
        self.messages = []  # what SMTP listeners accepted (for a relay's upstream)
        self.open = set()  # the writers of open connections
        self.lock = threading.Lock()

    def record(self, login):
        with self.lock:
            self.logins.append(login)

    def record_message(self, message):
        with self.lock:
            self.messages.append(message)

    def listen(self, protocol, tls="implicit", cert=None, mode="answer", answer=None, name=None,
               size=100 * 1024 * 1024):
        """Starts a listener on a free port of 127.0.0.1; its port. `tls` is implicit, starttls or
        none; `cert` a (certificate, key) pair of files, needed unless `tls` is none; `answer` the
        final answer to the login (IMAP without its tag), None to accept it."""
        if protocol not in ("smtp", "imap", "pop3") or tls not in ("implicit", "starttls", "none"):
            raise ValueError(f"unknown protocol or tls: {protocol} {tls}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode}")
        context = None
        if tls != "none":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, cert))
        name = name or f"{protocol}-{tls}-{mode}-{len(self.listeners)}"
        listener = Listener(name, protocol, tls, mode, answer, context, size)

        async def serve(reader, writer):
            listener.connections += 1
            self.open.add(writer)
            try:
                await Session(self, listener, reader, writer).run()
            except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError):
                pass  # the client went away or broke the protocol: nothing to answer
            finally:
                self.open.discard(writer)
                writer.close()

        async def start():
            listener.server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=MAX_LINE)
            listener.port = listener.server.sockets[0].getsockname()[1]

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)
        self.listeners[name] = listener
        return listener.port

    def logins_at(self, name):
        with self.lock:
            return [login for login in self.logins if login.listener == name]

    def plaintext_logins(self):
        """Every SASL response sent without TLS to a listener that was to have TLS."""
        with self.lock:
            return [login for login in self.logins if not login.tls and self.listeners[login.listener].tls != "none"]

    def stop(self):
        async def close():
            for listener in self.listeners.values():
                listener.server.close()
            for writer in list(self.open):
                writer.transport.abort()
            await asyncio.sleep(0.1)  # the sessions see their connection end
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
