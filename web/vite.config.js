// Builds the TestExecution page into server/web/, which ships inside the wheel (pyproject
// package-data). Deterministic: the same lock and sources give byte-identical files, so
// tests/unit/test_web_build.py can rebuild into a temp dir and compare.
import { defineConfig } from "vite";
import { fileURLToPath } from "node:url";

const outDir = process.env.TESTPULSE_WEB_OUT || fileURLToPath(new URL("../server/web", import.meta.url));

export default defineConfig({
  base: "/",
  logLevel: "warn",
  build: {
    outDir,
    emptyOutDir: true,
    assetsDir: "assets",
    // No inline script: the CSP forbids it, and a modulepreload polyfill is not needed by any
    // browser that runs ES modules with import maps-free code like ours.
    modulePreload: { polyfill: false },
    assetsInlineLimit: 0,
    cssCodeSplit: false,
    sourcemap: false,
    reportCompressedSize: false,
    target: "es2020",
  },
});
