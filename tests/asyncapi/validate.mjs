// Parse an AsyncAPI document with the official parser and print its diagnostics as JSON lines.
// Usage: node validate.mjs DOCUMENT.json  (exit 0 even when the document has errors: the caller decides)
import { readFile } from 'node:fs/promises';
import { Parser } from '@asyncapi/parser';

const SEVERITY = ['error', 'warning', 'information', 'hint'];
const text = await readFile(process.argv[2], 'utf8');
const { diagnostics } = await new Parser().parse(text);
for (const d of diagnostics) {
  console.log(JSON.stringify({
    severity: SEVERITY[d.severity] ?? String(d.severity),
    code: String(d.code),
    message: d.message,
    path: d.path.join('/'),
  }));
}
