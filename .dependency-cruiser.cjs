'use strict'

/*
 * The layer rules of docs/ARCHITECTURE ("Where things live"), checked by `npm run lint:deps` in
 * `npm test`, so the picture cannot drift from the code. Data flows down the layers (broker → hub
 * → session → transport) and no arrow goes back up: a layer knows the ones above it, never a
 * consumer of its own. Each rule says why it holds; a failure prints the rule's name.
 */

const LAYERS = {
  wire: '^lib/wire/',
  core: '^lib/core/',
  broker: '^lib/broker/',
  bridge: '^lib/bridge/',
  hub: '^lib/hub/',
  session: '^lib/session/',
  transports: '^lib/transports/',
  protocols: '^lib/protocols/',
  http: '^lib/http/',
  channels: '^lib/channels/',
  logs: '^lib/channels/logs/',
  myJobs: '^lib/channels/my-jobs/',
  webhooks: '^lib/channels/webhooks/',
  worker: '^lib/worker/'
}

/** A rule that forbids `from` to import any of `to`. */
function forbid (name, comment, from, to) {
  return { name, comment, severity: 'error', from: { path: from }, to: { path: to } }
}

module.exports = {
  forbidden: [
    {
      name: 'no-circular',
      comment: 'A circle, even through types only, means two files are one responsibility or a layer imports its consumer; split the shared part out.',
      severity: 'error',
      from: {},
      to: { circular: true }
    },
    forbid('not-to-index',
      'lib/index.ts is the wiring of the plugin: a part that imports it calls back up into the wiring.',
      '^(lib|client)/', '^lib/index\\.ts$'),
    forbid('options-only-in-index',
      'Options are resolved once in lib/options.ts and each part gets the slice it reads, from lib/index.ts; a part that reads the whole options cannot be reused or tested alone.',
      '^(lib|client)/(?!index\\.ts$)', '^lib/options\\.ts$'),
    forbid('options-schema-only-in-options',
      'The options schema is applied in one place, lib/options.ts (resolveOptions), which gives each part what it reads.',
      '^(lib|client)/(?!options\\.ts$)', '^lib/options-schema\\.ts$'),
    forbid('wire-is-leaf',
      'lib/wire is shared with the browser client: it may import nothing outside itself, no package and no Node module.',
      LAYERS.wire, '^(?!lib/wire/)'),
    {
      name: 'client-imports-only-wire',
      comment: 'The client ships to browsers: of this repository it imports only itself and lib/wire, never server code or Node modules (React is its one package, a peer).',
      severity: 'error',
      from: { path: '^client/' },
      to: { pathNot: '^(client/|lib/wire/)|(^|/)node_modules/react/' }
    },
    forbid('errors-imports-only-wire',
      'lib/errors.ts is imported by every layer: it may know only the close codes of lib/wire.',
      '^lib/errors\\.ts$', '^lib/(?!wire/)'),
    forbid('core-imports-no-broker',
      'The core (events, versions, snapshot, keys) is the base of every layer: it imports only itself, lib/wire and lib/errors.ts.',
      LAYERS.core, '^lib/(?!core/|wire/|errors\\.ts$)'),
    forbid('broker-imports-only-core',
      'The broker sits on the core: it imports only itself, lib/core, lib/wire and lib/errors.ts, never the bridge or hub that use it.',
      LAYERS.broker, '^lib/(?!broker/|core/|wire/|errors\\.ts$)'),
    forbid('topology-only-in-broker',
      'Only lib/broker knows the pub/sub topology (PUBLISH or SPUBLISH): everything else goes through the Broker interface and its factory, so a new topology is one new file.',
      '^(?!lib/broker/)', '^lib/broker/(classic|sharded)\\.ts$'),
    forbid('bridge-knows-no-consumer',
      'The bridge writes to the broker; the hub, sessions, transports, protocols, routes, channels and workers are downstream of it.',
      LAYERS.bridge, '^lib/(hub|session|transports|protocols|http|channels|worker)/'),
    forbid('hub-knows-no-consumer',
      'The hub reads from the broker and knows nothing of the bridge beside it or of the sessions, transports, protocols, routes and channels that consume it.',
      LAYERS.hub, '^lib/(bridge|session|transports|protocols|http|channels|worker)/'),
    forbid('session-knows-no-transport',
      'A transport knows the session, not the other way round: the session writes to the Transport interface and knows no route, transport, feed or webhook.',
      LAYERS.session, '^lib/(bridge|transports|http|worker)/|^lib/channels/(my-jobs|webhooks)/'),
    {
      name: 'transports-know-no-routes',
      comment: 'A transport adapts one wire to the session; routes, feeds, webhooks and the bridge are not its business. The SSE transport serves HTTP routes, whose schemas are kept with every route\'s in lib/http/schemas.ts: that one file is allowed.',
      severity: 'error',
      from: { path: LAYERS.transports },
      to: { path: '^lib/(bridge|http|worker)/|^lib/channels/(my-jobs|webhooks)/', pathNot: '^lib/http/schemas\\.ts$' }
    },
    forbid('protocols-are-pure',
      'A protocol renders events and parses client messages: pure functions over the core and the wire, with no I/O layer.',
      LAYERS.protocols, '^lib/(broker|bridge|hub|session|transports|http|worker)/|^lib/channels/(my-jobs|webhooks)/'),
    forbid('http-knows-no-feed-or-webhook',
      'Routes enqueue and read jobs; the owner feed and webhooks listen to the bridge beside them, and the worker helper runs elsewhere.',
      LAYERS.http, '^lib/(worker)/|^lib/channels/(my-jobs|webhooks)/'),
    forbid('channels-know-no-worker',
      'Channels deliver beside sockets on the API side; the worker helper runs in other processes.',
      LAYERS.channels, '^lib/worker/'),
    forbid('worker-imports-only-core',
      'The worker helper runs inside BullMQ processors, without the plugin: it imports only the core, the broker, the wire, errors and the log and stream channels.',
      LAYERS.worker, '^lib/(?!worker/|core/|broker/|wire/|errors\\.ts$|channels/(logs|streams)/)')
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    // Type-only imports count: a circle through types is still two files that know each other.
    tsPreCompilationDeps: true,
    tsConfig: { fileName: 'tsconfig.json' },
    exclude: { path: '^(dist|node_modules)/' }
  }
}
