# The example app (example/server.ts) as one production image for both roles: ROLE=api serves
# HTTP and WebSockets, ROLE=worker runs the BullMQ workers. docker-compose.yml runs several of each.

# ---- build: compile the plugin and the example from TypeScript --------------------------------
FROM node:20-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.image.json ./
COPY lib ./lib
COPY example ./example
RUN npx tsc -p tsconfig.image.json && cp -r example/public build/example/public
# The browser client the example page imports (the plugin's clientRoute serves it from lib/client/).
COPY client ./client
COPY scripts/build-client.mjs ./scripts/
RUN node scripts/build-client.mjs --js-only && mkdir -p build/lib/client && cp dist/client/index.min.mjs build/lib/client/

# ---- production dependencies only ---------------------------------------------------------------
FROM node:20-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force

# ---- runtime: compiled JavaScript, production dependencies, no compiler, no npm at run time -----
FROM node:20-slim
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=8001 \
    UPLOAD_DIR=/data/uploads
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /src/build ./
COPY package.json ./
# Uploads live on a volume shared by the API instances (which write them) and the workers (which
# read them); the directory is created here so that a new volume starts owned by `node`.
RUN mkdir -p /data/uploads && chown node:node /data/uploads
USER node
EXPOSE 8001

# Liveness of an API instance (/job-progress/health answers while the process serves; readiness
# is /job-progress/ready).
# A worker serves no HTTP: its process running is its health.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["node", "-e", "if (process.env.ROLE === 'worker') process.exit(0); fetch('http://127.0.0.1:' + (process.env.PORT || 8001) + '/job-progress/health').then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]

# node itself is PID 1 (no npm, npx or shell wrapper), so SIGTERM reaches the app's graceful
# close: uploads get their grace period, sockets close with 1001, the bridge hands its work over.
CMD ["node", "example/server.js"]
