// Hocuspocus with its defaults and no extensions (documents in memory only),
// as the bench's peer: `node hocuspocus.mjs` with HOST and PORT set.
import { Server } from "@hocuspocus/server";

const server = new Server({
  address: process.env.HOST ?? "127.0.0.1",
  port: Number(process.env.PORT ?? 1234),
  quiet: true,
});
await server.listen();
