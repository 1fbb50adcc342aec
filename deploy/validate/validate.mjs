// validate.mjs — checks Kubernetes manifests offline (scripts/k8s-check.sh runs it):
//   1. each YAML document against the Kubernetes 1.27 OpenAPI schemas (kubernetes-models:
//      types, formats, required fields);
//   2. strictly, with no unknown field anywhere (a misspelt key is silently dropped by the API
//      server): every document type-checked by the TypeScript compiler against kubernetes-types,
//      whose excess-property check names the field;
//   3. what weightd's deployment needs (README.md, "Containers"): the DaemonSet shares the socket
//      directory through hostPath, mounts the models read-only, its /dev/shm is a memory emptyDir,
//      it asks for a GPU, its readiness comes from /readyz on the port its config listens on, no
//      hostIPC/hostPID; every other workload mounts the socket directory and no other hostPath,
//      with its own IPC and PID namespaces.
//
//   node validate.mjs FILE.yaml...     exit 0: all valid; 1: problems, each printed
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments } from "yaml";

const here = dirname(fileURLToPath(import.meta.url));
const problems = [];
const problem = (where, what) => problems.push(`${where}: ${what}`);

// apiVersion "apps/v1" -> ["apps", "v1"]; "v1" -> ["", "v1"].
const splitApiVersion = (v) => (v.includes("/") ? v.split("/") : ["", v]);

const docs = [];
for (const file of process.argv.slice(2)) {
  const parsed = parseAllDocuments(readFileSync(file, "utf8"));
  parsed.forEach((d, i) => {
    const where = `${basename(file)}#${i + 1}`;
    if (d.errors.length) return problem(where, `YAML: ${d.errors.map((e) => e.message).join("; ")}`);
    const obj = d.toJS();
    if (obj === null) return;
    if (!obj.apiVersion || !obj.kind) return problem(where, "no apiVersion or kind");
    docs.push({ where: `${where} (${obj.kind} ${obj.metadata?.name ?? "?"})`, obj });
  });
}
if (docs.length === 0) problem("input", "no Kubernetes documents");

// ---- 1. the schemas ----------------------------------------------------------------------------
for (const { where, obj } of docs) {
  const [group, version] = splitApiVersion(obj.apiVersion);
  const path = group ? `kubernetes-models/${group}/${version}/${obj.kind}` : `kubernetes-models/${version}/${obj.kind}`;
  let Model;
  try {
    Model = (await import(path))[obj.kind];
  } catch {
    problem(where, `unknown apiVersion/kind ${obj.apiVersion} ${obj.kind}`);
    continue;
  }
  try {
    new Model(obj).validate();
  } catch (e) {
    problem(where, `schema: ${e.message}`);
  }
}

// ---- 2. no unknown fields ----------------------------------------------------------------------
{
  const typesGroup = (g) => (g === "" ? "core" : g.replace(/\.k8s\.io$/, ""));
  let ts = "";
  docs.forEach(({ obj }, i) => {
    const [group, version] = splitApiVersion(obj.apiVersion);
    ts += `import type { ${obj.kind} as T${i} } from "kubernetes-types/${typesGroup(group)}/${version}";\n`;
    ts += `export const doc${i}: T${i} = ${JSON.stringify(obj, null, 2)};\n`;
  });
  const dir = mkdtempSync(join(tmpdir(), "weightd-k8s-"));
  try {
    const file = join(dir, "manifests.ts");
    writeFileSync(file, ts);
    const tsc = join(here, "node_modules", "typescript", "bin", "tsc");
    execFileSync(process.execPath, [tsc, "--noEmit", "--strict", "--module", "commonjs", "--moduleResolution", "node10",
      "--ignoreDeprecations", "5.0", "--typeRoots", "[]", "--baseUrl", join(here, "node_modules"), file],
    { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  } catch (e) {
    const lines = ts.split("\n");
    for (const m of `${e.stdout}`.matchAll(/manifests\.ts\((\d+),\d+\): error TS\d+: (.*)/g)) {
      // The document a line belongs to: the nearest "export const docN" above it.
      let n = Number(m[1]) - 1;
      while (n > 0 && !lines[n].startsWith("export const doc")) n--;
      const i = Number(/doc(\d+)/.exec(lines[n])?.[1] ?? 0);
      problem(docs[i].where, `unknown or mistyped field: ${m[2]} (line: ${lines[Number(m[1]) - 1].trim()})`);
    }
    if (!/error TS/.test(`${e.stdout}`)) problem("tsc", `${e.stdout}${e.stderr}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---- 3. what weightd needs --------------------------------------------------------------------
const SOCKET_DIR = "/run/weightd";
const podSpecs = docs.filter(({ obj }) => obj.spec?.template?.spec);
const configs = docs.filter(({ obj }) => obj.kind === "ConfigMap" && obj.data?.["weightd.toml"]);
const hostPaths = (spec) => (spec.volumes ?? []).filter((v) => v.hostPath);
const mountOf = (c, volume) => (c.volumeMounts ?? []).find((m) => m.name === volume);
let daemonSets = 0;
for (const { where, obj } of podSpecs) {
  const spec = obj.spec.template.spec;
  if (spec.hostIPC) problem(where, "hostIPC: segments reach clients as fds; no workload shares the host's IPC namespace");
  if (spec.hostPID) problem(where, "hostPID: not needed with the VMM export (README, Containers)");
  const sock = hostPaths(spec).find((v) => v.hostPath.path === SOCKET_DIR);
  if (!sock) {
    problem(where, `no hostPath volume for the socket directory ${SOCKET_DIR}`);
    continue;
  }
  const containers = spec.containers ?? [];
  if (!containers.some((c) => mountOf(c, sock.name)?.mountPath === SOCKET_DIR))
    problem(where, `no container mounts the socket directory at ${SOCKET_DIR}`);
  // The daemon's container runs the weightd binary; any other workload is a client.
  const d = containers.find((c) => (c.command ?? [])[0]?.endsWith("/weightd"));
  if (!d) {
    for (const v of hostPaths(spec))
      if (v !== sock) problem(where, `a client mounts the host path ${v.hostPath.path}; it needs only ${SOCKET_DIR}`);
    continue;
  }
  daemonSets++;
  if (obj.kind !== "DaemonSet") problem(where, "the daemon should run as a DaemonSet (one per node)");
  const models = (d.volumeMounts ?? []).find((m) => m.mountPath.startsWith("/srv/models"));
  if (!models) problem(where, "the daemon mounts no model volume under /srv/models");
  else if (models.readOnly !== true) problem(where, "the model volume is not mounted readOnly");
  const shm = (d.volumeMounts ?? []).find((m) => m.mountPath === "/dev/shm");
  const shmVol = shm && (spec.volumes ?? []).find((v) => v.name === shm.name);
  if (shmVol?.emptyDir?.medium !== "Memory")
    problem(where, "/dev/shm is not a memory emptyDir (a container's default 64 MiB fails loads with shm.no_space)");
  if (!d.resources?.limits?.["nvidia.com/gpu"]) problem(where, "the daemon asks the device plugin for no nvidia.com/gpu");
  if (!d.resources?.limits?.memory) problem(where, "the daemon has no memory limit");
  const probe = JSON.stringify(d.readinessProbe ?? {});
  if (!probe.includes("/readyz")) problem(where, "the readiness probe does not read /readyz");
  const cfg = configs.map(({ obj: c }) => c.data["weightd.toml"]).join("\n");
  const listen = /^\s*http_listen\s*=\s*"([^"]+)"/m.exec(cfg)?.[1];
  const socket = /^\s*socket\s*=\s*"ipc:\/\/([^"]+)"/m.exec(cfg)?.[1];
  if (!listen) problem(where, "the config sets no http_listen, so /readyz is not served");
  else if (!probe.includes(listen.split(":").pop())) problem(where, `the readiness probe does not use the port of http_listen ${listen}`);
  if (!socket || dirname(socket) !== SOCKET_DIR) problem(where, `the config's socket ${socket} is not in ${SOCKET_DIR}`);
}
if (daemonSets !== 1) problem("input", `expected exactly one weightd DaemonSet, found ${daemonSets}`);

for (const p of problems) console.log(`k8s-check: ${p}`);
if (problems.length) {
  console.log(`k8s-check: ${problems.length} problem(s) in ${docs.length} documents`);
  process.exit(1);
}
console.log(`k8s-check: ${docs.length} documents valid (Kubernetes 1.27 schemas, no unknown fields, weightd's rules)`);
