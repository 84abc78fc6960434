// Embeds texts and images with transformers.js from a clip-trainer output folder, as a JavaScript user would: the
// folder's tokenizer, image processor and `onnx/text_model.onnx` / `onnx/vision_model.onnx`, nothing downloaded.
//
//   node embed.mjs REQUEST.json
//
// REQUEST.json: {"model_dir": ..., "family": "clip" | "siglip", "max_length": N, "texts": [...], "images": [paths]}
// Prints one JSON object: input_ids, attention_mask, pixel_values, text_embeds, image_embeds (as nested lists).
import { readFileSync } from 'node:fs';
import path from 'node:path';
import {
    env, AutoTokenizer, AutoProcessor, RawImage,
    CLIPTextModelWithProjection, CLIPVisionModelWithProjection, SiglipTextModel, SiglipVisionModel,
} from '@huggingface/transformers';

const request = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const folder = path.resolve(request.model_dir);
// Local files only: the model id is the folder's name under `localModelPath`.
env.allowRemoteModels = false;
env.localModelPath = path.dirname(folder);
const name = path.basename(folder);

const siglip = request.family === 'siglip';
const tokenizer = await AutoTokenizer.from_pretrained(name);
const processor = await AutoProcessor.from_pretrained(name);
const TextModel = siglip ? SiglipTextModel : CLIPTextModelWithProjection;
const VisionModel = siglip ? SiglipVisionModel : CLIPVisionModelWithProjection;
const text_model = await TextModel.from_pretrained(name, { dtype: 'fp32' });
const vision_model = await VisionModel.from_pretrained(name, { dtype: 'fp32' });

// SigLIP's text tower pools at the last position: captions are padded to the length it was trained with.
const padding = siglip ? 'max_length' : true;
const text_inputs = tokenizer(request.texts, { padding, truncation: true, max_length: request.max_length });
// transformers.js truncates after adding the special tokens, so a caption longer than `max_length` loses its end
// token, where CLIP pools (and SigLIP's last position); transformers keeps it. Put it back in the last position:
// the ids are then those of transformers' truncation.
const [rows, length] = text_inputs.input_ids.dims;
for (let row = 0; row < rows; ++row) {
    const last = row * length + length - 1;
    if (text_inputs.attention_mask.data[last] === 1n) {
        text_inputs.input_ids.data[last] = BigInt(tokenizer.eos_token_id);
    }
}
const { text_embeds } = await text_model(text_inputs);
const images = await Promise.all(request.images.map((file) => RawImage.read(file)));
const image_inputs = await processor(images);
const { image_embeds } = await vision_model(image_inputs);

const numbers = (tensor) => JSON.parse(JSON.stringify(tensor.tolist(), (key, value) =>
    typeof value === 'bigint' ? Number(value) : value));
console.log(JSON.stringify({
    input_ids: numbers(text_inputs.input_ids),
    attention_mask: numbers(text_inputs.attention_mask),
    pixel_values: numbers(image_inputs.pixel_values),
    text_embeds: numbers(text_embeds),
    image_embeds: numbers(image_embeds),
}));
