import { loadTokenizer } from "./core/tokenizer.ts";
const tok = await loadTokenizer("/work/shared/data/qwen2-tokenizer");
for (const s of ["龘", "𝔘", "🫠", "饕餮", "ꙮ", "𓀀", "🦜🦚"]) console.log(s, tok.encode(s), tok.encode(s).map(i=>JSON.stringify(tok.decode([i]))));
console.log(tok.decode([151700, 9707]), JSON.stringify(tok.decode([9707, 151645], true)), tok.decode([9707,151645]));
