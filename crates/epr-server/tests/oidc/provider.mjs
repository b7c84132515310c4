// A real OpenID provider (the `oidc-provider` package) for the end-to-end authentication
// tests: it issues JWT access tokens through a real OAuth 2.0 client credentials grant.
//
//   node provider.mjs --port P --keys-dir DIR --keys k1,k2 [--audience kaa-rest-api]
//
// Each name in --keys is an RSA signing key kept as DIR/<name>.json (made on first use), so
// a restart with other names rotates the keys: the first one signs, the others are only
// published. Clients: `epr-admin` (every EPR scope) and `epr-reader` (endpoint:read only),
// secret = client ID + "-secret". Prints "READY <issuer>" once listening.
import { Provider } from 'oidc-provider';
import { generateKeyPairSync } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, v, i, a) => (i % 2 === 0 ? [...acc, [v.replace(/^--/, ''), a[i + 1]]] : acc), []),
);
const port = Number(args.port);
const audience = args.audience ?? 'kaa-rest-api';
const issuer = `http://127.0.0.1:${port}`;

function key(name) {
  const file = join(args['keys-dir'], `${name}.json`);
  if (!existsSync(file)) {
    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    writeFileSync(file, JSON.stringify({ ...privateKey.export({ format: 'jwk' }), kid: name, alg: 'RS256', use: 'sig' }));
  }
  return JSON.parse(readFileSync(file, 'utf8'));
}

const ALL = [
  'endpoint:read', 'endpoint:update', 'endpoint:delete', 'application:endpoint:create',
  'application:endpoints-metadata-keys:read', 'application:read',
  'application:endpoint-filter:read', 'application:endpoint-filter:create',
  'application:endpoint-filter:update', 'application:endpoint-filter:delete',
];
const granted = { 'epr-admin': ALL, 'epr-reader': ['endpoint:read'] };

const provider = new Provider(issuer, {
  jwks: { keys: args.keys.split(',').map(key) },
  clients: Object.keys(granted).map((id) => ({
    client_id: id,
    client_secret: `${id}-secret`,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    scope: granted[id].join(' '),
  })),
  scopes: ALL,
  features: {
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:kaa:rest-api',
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource, client) => ({
        scope: granted[client.clientId].join(' '),
        audience,
        accessTokenTTL: 600,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
});
provider.listen(port, '127.0.0.1', () => console.log(`READY ${issuer}`));
