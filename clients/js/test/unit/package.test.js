// The package as `npm pack` makes it: the workspace's version, the build and its types.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const PKG = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

test("the package version is the workspace version", () => {
  const cargo = readFileSync(path.join(PKG, "../../Cargo.toml"), "utf8");
  const workspace = /\[workspace\.package\][^[]*?\nversion = "([^"]+)"/.exec(cargo)[1];
  const pkg = JSON.parse(readFileSync(path.join(PKG, "package.json"), "utf8"));
  assert.equal(pkg.version, workspace);
});

test("npm pack holds the ESM build, its type declarations and the README", () => {
  const out = execFileSync("npm", ["pack", "--dry-run", "--json", "--ignore-scripts"], { cwd: PKG, encoding: "utf8" });
  const files = JSON.parse(out)[0].files.map((f) => f.path);
  for (const f of ["dist/index.js", "dist/index.d.ts", "dist/client.js", "dist/client.d.ts", "README.md", "package.json"]) {
    assert.ok(files.includes(f), `${f} is packed (${files.join(", ")})`);
  }
  assert.ok(!files.some((f) => f.startsWith("test/") || f.startsWith("src/") || f.startsWith("node_modules/")));
});

test("the type declarations accept both WebSockets and the documented usage", () => {
  execFileSync(process.execPath, [path.join(PKG, "node_modules/typescript/bin/tsc"), "-p", "test/types"], { cwd: PKG, encoding: "utf8" });
});
