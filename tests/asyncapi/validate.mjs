// Parse AsyncAPI documents with the official parser; print each diagnostic as a JSON line.
// Usage: node validate.mjs DOCUMENT.json...  (exit 0 even when a document has errors: the caller decides)
import { readFile } from 'node:fs/promises';
import { Parser } from '@asyncapi/parser';

const SEVERITY = ['error', 'warning', 'information', 'hint'];
const parser = new Parser();
for (const file of process.argv.slice(2)) {
  const { diagnostics } = await parser.parse(await readFile(file, 'utf8'));
  for (const d of diagnostics) {
    console.log(JSON.stringify({
      file,
      severity: SEVERITY[d.severity] ?? String(d.severity),
      code: String(d.code),
      message: d.message,
      path: d.path.join('/'),
    }));
  }
}
