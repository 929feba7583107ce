# The example app (example/server.ts) as one image for both roles: ROLE=api serves HTTP and
# WebSockets, ROLE=worker runs the BullMQ workers. docker-compose.yml runs several of each.
FROM node:20-slim

WORKDIR /app

# Dependencies first, so that a source change does not reinstall them. Dev dependencies are
# included on purpose: the example runs from TypeScript through tsx, with no build step.
COPY package.json package-lock.json ./
RUN npm ci --include=dev --no-audit --no-fund && npm cache clean --force

COPY tsconfig.json ./
COPY lib ./lib
COPY example ./example

# Uploads live on a volume shared by the API instances (which write them) and the workers
# (which read them); the directory is created here so the volume starts owned by `node`.
RUN mkdir -p /data/uploads && chown node:node /data/uploads
USER node

ENV HOST=0.0.0.0 \
    PORT=8001 \
    UPLOAD_DIR=/data/uploads
EXPOSE 8001

# node itself is PID 1 (no npm or npx wrapper), so SIGTERM reaches the app's graceful close:
# sockets are closed with 1001 and the bridge hands its work to the other instances.
CMD ["node", "--import", "tsx", "example/server.ts"]
