// What the page (index.html) takes from CodeMirror 6. `npm ci && npm run build`
// bundles it into editor.js and editor.js.gz, which are committed: users build nothing.
export { EditorState, StateField, StateEffect, Compartment, Annotation, Transaction, Prec } from "@codemirror/state";
export { EditorView, Decoration, WidgetType, keymap } from "@codemirror/view";
export { basicSetup } from "codemirror";
export { indentWithTab } from "@codemirror/commands";
export { indentUnit } from "@codemirror/language";
export { autocompletion } from "@codemirror/autocomplete";
export { python } from "@codemirror/lang-python";
export { javascript } from "@codemirror/lang-javascript";
export { oneDark } from "@codemirror/theme-one-dark";
