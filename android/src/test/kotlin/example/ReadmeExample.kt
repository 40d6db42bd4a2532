package example

// The README's Kotlin example: compiled and run by the JVM tests (dev.acorn.ReadmeExampleTest),
// and tests/tests/jvm_api.rs checks that the README shows this code as it is here.
// README:begin
import dev.acorn.GenerateOptions
import dev.acorn.Model
import dev.acorn.Tensor

/** A sentence embedding from token ids (your tokenizer's) with a MiniLM `.acorn` file. */
fun embed(path: String, ids: LongArray): FloatArray =
    Model.open(path).use { model ->
        val n = ids.size.toLong()
        val out = model.run(mapOf(
            "input_ids" to Tensor.of(ids, 1, n),
            "attention_mask" to Tensor.of(LongArray(ids.size) { 1 }, 1, n)
        ))
        out.getValue(model.outputs.last().name).floats()
    }

/** Streams a reply from a small LLM `.acorn` file (converted with its tokenizer). */
fun complete(path: String, prompt: String): String =
    Model.open(path).use { model ->
        model.newGenerator(threads = 2).use { generator ->
            generator.generate(prompt, GenerateOptions(maxTokens = 16)) { piece, _ ->
                print(piece) // each piece as it is generated; return false to stop
                true
            }.text
        }
    }
// README:end
