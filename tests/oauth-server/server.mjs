// A real OAuth 2.0 / OpenID Connect server for the operator's tests: oidc-provider over TLS on
// 127.0.0.1, refresh tokens rotated on every use (a replayed one revokes the whole grant),
// client credentials, the device flow, introspection and revocation. Test-only routes under /test/
// seed a refresh token the way a person's consent would, approve or decline a device code as a
// person at /device would, make the next device polls answer slow_down, and count requests;
// /interaction/<uid> plays the login and consent pages of the authorization code flow.
//
// Environment: TLS_CERT, TLS_KEY (PEM files), PORT (0 = any), ACCESS_TOKEN_TTL (seconds),
// CLIENT_CERT_FILE (optional: the certificate of the private_key_jwt client mail-cert),
// SERVICE_ACCOUNT_PUBLIC_KEY_FILE and SERVICE_ACCOUNT_EMAIL (optional: a JWT bearer service account),
// APP_TOKEN_EMAIL (optional: the mailbox client-credentials tokens may open),
// FAST_ACCESS_TOKEN_TTL (seconds, for client mail-app-fast), INTROSPECTION_PORT (optional
// plain-http listener for Dovecot on 127.0.0.1), DISCOVERY=rfc8414 (no OpenID Connect discovery:
// metadata only at RFC 8414's /.well-known/oauth-authorization-server).
// Prints one JSON line {"issuer", "port", "introspectionPort"} on stdout when listening.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { jwtVerify } from 'jose';
import Provider, { errors } from 'oidc-provider';

const accessTtl = Number(process.env.ACCESS_TOKEN_TTL || 3600);
const fastTtl = Number(process.env.FAST_ACCESS_TOKEN_TTL || 60);
const stats = {
  token_requests: 0, token_requests_by_grant: {}, grants_by_client: {}, errors_by_client: {}, device_polls: 0, device_codes: 0,
};
// Device polls to answer with slow_down before the provider sees them (oidc-provider never sends it).
let slowDown = 0;
const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const bump = (map, key) => {
  map[key] = (map[key] || 0) + 1;
};

const clients = [
  {
    client_id: 'mail-app',
    client_secret: 'mail-app-secret',
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    redirect_uris: ['https://127.0.0.1/callback'],
    token_endpoint_auth_method: 'client_secret_post',
    scope: 'openid offline_access email mail',
  },
  {
    client_id: 'mail-app-basic',
    client_secret: 'mail-app-basic-secret',
    grant_types: ['client_credentials', 'refresh_token', 'authorization_code'],
    response_types: ['code'],
    redirect_uris: ['https://127.0.0.1/callback'],
    token_endpoint_auth_method: 'client_secret_basic',
    scope: 'openid offline_access email mail',
  },
  {
    // Same as mail-app, with short-lived access tokens (FAST_ACCESS_TOKEN_TTL).
    client_id: 'mail-app-fast',
    client_secret: 'mail-app-fast-secret',
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    response_types: ['code'],
    redirect_uris: ['https://127.0.0.1/callback'],
    token_endpoint_auth_method: 'client_secret_post',
    scope: 'openid offline_access email mail',
  },
  {
    // Like mail-app, but its refresh tokens are not rotated (Google's behaviour; Microsoft keeps
    // old ones valid too): a token used twice still works.
    client_id: 'mail-app-stable',
    client_secret: 'mail-app-stable-secret',
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    response_types: ['code'],
    redirect_uris: ['https://127.0.0.1/callback'],
    token_endpoint_auth_method: 'client_secret_post',
    scope: 'openid offline_access email mail',
  },
  {
    // A public client (Entra's "allow public client flows", a Google desktop client): no secret;
    // device flow, and authorization code with PKCE to a loopback redirect URI on any port.
    client_id: 'mail-device',
    application_type: 'native',
    grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback', 'http://localhost/callback'],
    token_endpoint_auth_method: 'none',
    scope: 'openid offline_access email mail',
  },
  {
    // A confidential web client whose redirect URI is the operator's loopback callback (any port).
    client_id: 'mail-web',
    client_secret: 'mail-web-secret',
    application_type: 'native',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback', 'http://localhost/callback'],
    token_endpoint_auth_method: 'client_secret_post',
    scope: 'openid offline_access email mail',
  },
  {
    // Dovecot's introspection client (HTTP Basic credentials in its introspection_url).
    client_id: 'introspector',
    client_secret: 'introspector-secret',
    grant_types: [],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  },
];

// A private_key_jwt client whose key is the certificate in CLIENT_CERT_FILE (Entra's
// certificate credentials; oidc-provider checks the signed client assertion against it).
if (process.env.CLIENT_CERT_FILE) {
  const jwk = new crypto.X509Certificate(fs.readFileSync(process.env.CLIENT_CERT_FILE)).publicKey.export({ format: 'jwk' });
  clients.push({
    client_id: 'mail-cert',
    application_type: 'native',
    grant_types: ['client_credentials', 'refresh_token', 'authorization_code', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback', 'http://localhost/callback'],
    token_endpoint_auth_method: 'private_key_jwt',
    // Entra's certificate credentials ask for PS256: an RS256 assertion is refused here.
    token_endpoint_auth_signing_alg: 'PS256',
    jwks: { keys: [jwk] },
    scope: 'openid offline_access email mail',
  });
}

// A service account for the JWT bearer grant (Google's domain-wide delegation): its public key
// is in SERVICE_ACCOUNT_PUBLIC_KEY_FILE, its email SERVICE_ACCOUNT_EMAIL; it may act for anyone.
const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
if (process.env.SERVICE_ACCOUNT_PUBLIC_KEY_FILE) {
  clients.push({
    client_id: 'mail-sa',
    grant_types: [JWT_BEARER],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'none',
    scope: 'openid email mail',
  });
}

function listen(server, port) {
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server.address().port)));
}

async function readJson(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return body ? JSON.parse(body) : {};
}

function send(res, status, value) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(value));
}

const epoch = () => Math.floor(Date.now() / 1000);

let provider;

// Creates a grant and a refresh token for `accountId`, as a completed consent would.
async function seed({ accountId, clientId = 'mail-app', scope = 'openid offline_access email mail' }) {
  const client = await provider.Client.find(clientId);
  const grant = new provider.Grant({ accountId, clientId });
  grant.addOIDCScope(scope);
  const grantId = await grant.save();
  const refreshToken = new provider.RefreshToken({
    client,
    accountId,
    grantId,
    scope,
    gty: 'authorization_code',
    authTime: epoch(),
    iiat: epoch(),
    rotations: 0,
    expiresWithSession: false,
  });
  return { refresh_token: await refreshToken.save(), grant_id: grantId };
}

// Completes a device authorization as a person approving (or declining) it at /device would.
async function decide({ userCode, accountId, deny = false }) {
  // Stored as oidc-provider's code verification page would look it up: without separators.
  const code = await provider.DeviceCode.findByUserCode(String(userCode).replace(/[^a-zA-Z0-9]/g, '').toUpperCase());
  if (!code) return { error: 'unknown user code' };
  if (deny) {
    Object.assign(code, { error: 'access_denied', errorDescription: 'the person declined' });
  } else {
    // The scope the device asked for, as the consent page would grant it.
    const scope = code.scope || (code.params && code.params.scope) || 'openid';
    const grant = new provider.Grant({ accountId, clientId: code.clientId });
    grant.addOIDCScope(scope);
    Object.assign(code, { accountId, authTime: epoch(), grantId: await grant.save(), scope });
  }
  await code.save();
  return { ok: true, clientId: code.clientId };
}

// The login and consent pages, played by a test: /interaction/<uid>?account=<id> signs in as
// <id> (default: the login_hint) and consents to what was asked; &deny=1 declines.
async function interaction(req, res) {
  try {
    const url = new URL(req.url, issuer);
    const details = await provider.interactionDetails(req, res);
    const { prompt, params } = details;
    if (url.searchParams.get('deny')) {
      return await provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'the person declined' }, { mergeWithLastSubmission: false });
    }
    if (prompt.name === 'login') {
      // A device code entered at /device has no login_hint: DEFAULT_ACCOUNT stands in (the demo).
      const accountId = url.searchParams.get('account') || params.login_hint || process.env.DEFAULT_ACCOUNT;
      return await provider.interactionFinished(req, res, { login: { accountId } }, { mergeWithLastSubmission: false });
    }
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    return await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  } catch (e) {
    return send(res, 400, { error: 'interaction_failed', error_description: String(e && e.message) });
  }
}

async function testRoute(req, res) {
  try {
    if (req.method === 'POST' && req.url === '/test/seed') return send(res, 200, await seed(await readJson(req)));
    if (req.method === 'POST' && req.url === '/test/device/approve') return send(res, 200, await decide(await readJson(req)));
    if (req.method === 'POST' && req.url === '/test/device/deny') {
      return send(res, 200, await decide({ ...(await readJson(req)), deny: true }));
    }
    if (req.method === 'POST' && req.url === '/test/device/slow-down') {
      slowDown += Number((await readJson(req)).polls || 1);
      return send(res, 200, { slowDown });
    }
    if (req.method === 'GET' && req.url === '/test/stats') return send(res, 200, stats);
    return send(res, 404, { error: 'not_found' });
  } catch (e) {
    return send(res, 500, { error: 'server_error', error_description: String(e && e.message) });
  }
}

const tls = { cert: fs.readFileSync(process.env.TLS_CERT), key: fs.readFileSync(process.env.TLS_KEY) };
let callback;
// DISCOVERY=rfc8414: a plain OAuth 2.0 server without OpenID Connect discovery, publishing its
// metadata only at RFC 8414's /.well-known/oauth-authorization-server.
const rfc8414Only = process.env.DISCOVERY === 'rfc8414';
const server = https.createServer(tls, async (req, res) => {
  if (req.url.startsWith('/test/')) return testRoute(req, res);
  if (rfc8414Only && req.url.startsWith('/.well-known/openid-configuration')) return send(res, 404, { error: 'not_found' });
  if (rfc8414Only && req.url === '/.well-known/oauth-authorization-server') req.url = '/.well-known/openid-configuration';
  if (req.method === 'GET' && req.url.startsWith('/interaction/')) return interaction(req, res);
  if (req.method === 'POST' && req.url.startsWith('/device/auth')) stats.device_codes += 1;
  if (req.method === 'POST' && req.url.startsWith('/token')) {
    stats.token_requests += 1;
    // Read the form here (oidc-provider takes an already read body from req.body) to count device
    // polls and answer slow_down when a test asked for it.
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    req.body = Buffer.concat(chunks);
    if (new URLSearchParams(req.body.toString()).get('grant_type') === DEVICE_GRANT) {
      stats.device_polls += 1;
      if (slowDown > 0) {
        slowDown -= 1;
        return send(res, 400, { error: 'slow_down', error_description: 'polling too fast' });
      }
    }
  }
  return callback(req, res);
});
const port = await listen(server, Number(process.env.PORT || 0));
const issuer = `https://127.0.0.1:${port}`;

provider = new Provider(issuer, {
  clients,
  scopes: ['openid', 'offline_access', 'email', 'mail'],
  claims: { email: ['email'] },
  // id_tokens carry the scope's claims (email), as Google's and Microsoft's do: identity pinning.
  // CONFORM_ID_TOKEN_CLAIMS=true keeps them out (only userinfo says who consented).
  conformIdTokenClaims: process.env.CONFORM_ID_TOKEN_CLAIMS === 'true',
  interactions: { url: (ctx, i) => `/interaction/${i.uid}` },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    deviceFlow: { enabled: true },
  },
  rotateRefreshToken: (ctx) => !(ctx.oidc.client && ctx.oidc.client.clientId === 'mail-app-stable'),
  ttl: {
    AccessToken: (ctx, token, client) => (client && client.clientId === 'mail-app-fast' ? fastTtl : accessTtl),
    ClientCredentials: (ctx, token, client) => (client && client.clientId === 'mail-app-fast' ? fastTtl : accessTtl),
    RefreshToken: 30 * 24 * 3600,
    DeviceCode: Number(process.env.DEVICE_CODE_TTL || 600),
    Grant: 30 * 24 * 3600,
  },
  findAccount: async (ctx, id) => ({ accountId: id, claims: async () => ({ sub: id, email: id }) }),
  // An app-only token names no user. APP_TOKEN_EMAIL plays Exchange's mailbox permission for the
  // application: its client-credentials tokens may open that mailbox (Dovecot checks email).
  extraTokenClaims: async (ctx, token) => {
    if (token.accountId) return { email: token.accountId };
    return process.env.APP_TOKEN_EMAIL ? { email: process.env.APP_TOKEN_EMAIL } : undefined;
  },
  issueRefreshToken: async (ctx, client, code) =>
    client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
});
if (process.env.SERVICE_ACCOUNT_PUBLIC_KEY_FILE) {
  const key = crypto.createPublicKey(fs.readFileSync(process.env.SERVICE_ACCOUNT_PUBLIC_KEY_FILE));
  provider.registerGrantType(JWT_BEARER, async (ctx) => {
    let claims;
    try {
      ({ payload: claims } = await jwtVerify(ctx.oidc.params.assertion, key, {
        issuer: process.env.SERVICE_ACCOUNT_EMAIL, audience: `${issuer}/token`, maxTokenAge: '1h',
      }));
    } catch (e) {
      throw new errors.InvalidGrant(`invalid JWT: ${e.message}`);
    }
    const scope = String(claims.scope || '');
    const grant = new provider.Grant({ accountId: claims.sub, clientId: ctx.oidc.client.clientId });
    grant.addOIDCScope(scope);
    const grantId = await grant.save();
    const at = new provider.AccessToken({ accountId: claims.sub, client: ctx.oidc.client, grantId, scope, gty: 'jwt_bearer' });
    ctx.body = { access_token: await at.save(), token_type: 'Bearer', expires_in: at.expiration, scope };
  }, new Set(['assertion']));
}

provider.on('grant.success', (ctx) => {
  bump(stats.token_requests_by_grant, ctx.oidc.params.grant_type);
  if (ctx.oidc.client) bump(stats.grants_by_client, ctx.oidc.client.clientId);
});
provider.on('grant.error', (ctx, err) => {
  if (ctx.oidc && ctx.oidc.client) bump(stats.errors_by_client, ctx.oidc.client.clientId);
  console.error(`grant.error ${ctx.oidc.params.grant_type}: ${err.error} ${err.error_detail || ''}`);
});
provider.on('server_error', (ctx, err) => console.error(`server_error: ${err && err.stack}`));
callback = provider.callback();

let introspectionPort = null;
if (process.env.INTROSPECTION_PORT) {
  const plain = http.createServer((req, res) => {
    // Introspection for Dovecot over plain http on loopback; the provider sees https.
    req.headers['x-forwarded-proto'] = 'https';
    return callback(req, res);
  });
  provider.proxy = true;
  introspectionPort = await listen(plain, Number(process.env.INTROSPECTION_PORT));
}

console.log(JSON.stringify({ issuer, port, introspectionPort }));
