package dev.acorn

/** Receives each generated token: [piece] is the text it completes (empty while a character
 * spans tokens), [token] its id. Return false to stop. Called on the generating thread. */
interface TokenListener {
    fun onToken(piece: String, token: Int): Boolean
}

/** How the tokens after the first are computed (exit heads come from `acorn convert --exits`). */
sealed class Decoding {
    /** Every token through every layer. */
    object Plain : Decoding()
    /** Self-speculative: [draftTokens] drafted by the exit after [exitLayer], verified by the
     * full model; greedy output is plain decoding's. */
    data class Speculative @JvmOverloads constructor(val exitLayer: Int, val draftTokens: Int = 4) : Decoding()
    /** Self-speculative at the setting predicted fastest; plain decoding where none pays. */
    object Auto : Decoding()
    /** Per-token early exit (lossy): stop at the first exit whose top probability reaches [threshold]. */
    data class EarlyExit(val threshold: Float) : Decoding()
}

/** How to pick tokens: greedy when [temperature] is 0 (the default), decoded as [decoding] says. */
data class GenerateOptions @JvmOverloads constructor(
    val maxTokens: Int = 64,
    val temperature: Float = 0f,
    val topK: Int = 0,
    val topP: Float = 1f,
    val seed: Long = 0,
    val decoding: Decoding = Decoding.Plain
)

/** Why a generation stopped. */
enum class StopReason { MAX_TOKENS, STOP_TOKEN, CONTEXT_FULL, CANCELLED }

/** What one [Generator.generate] call produced. */
class Generation(
    /** The generated text. */
    val text: String,
    /** The generated token ids. */
    val tokens: IntArray,
    /** Prompt tokens run (prefill). */
    val promptTokens: Int,
    val prefillMs: Double,
    val decodeMs: Double,
    val stopReason: StopReason,
    /** Self-speculative decoding: drafts accepted per verification (else 0). */
    val acceptedPerDraft: Double = 0.0,
    /** Layers run per token after the first. */
    val meanLayersPerToken: Double = 0.0
)

/**
 * Text generation with a model's KV cache and embedded tokenizer. A conversation goes on across
 * calls until [reset]. [cancel] may be called from any thread to stop a running generation.
 */
class Generator internal constructor(handle: Long) : AutoCloseable {
    @Volatile private var handle: Long = handle

    /** Generates after [prompt], streaming each token to [onToken] (return false to stop). */
    @JvmOverloads
    fun generate(prompt: String, options: GenerateOptions = GenerateOptions(), onToken: TokenListener? = null): Generation =
        run(prompt, null, options, onToken)

    /** Generates after [prompt], streaming each token's text and id to [onToken]. */
    fun generate(prompt: String, options: GenerateOptions, onToken: (piece: String, token: Int) -> Boolean): Generation =
        run(prompt, null, options, listener(onToken))

    /** Generates after a prompt given as token ids. */
    @JvmOverloads
    fun generate(prompt: IntArray, options: GenerateOptions = GenerateOptions(), onToken: TokenListener? = null): Generation =
        run(null, prompt, options, onToken)

    private fun listener(f: (String, Int) -> Boolean) = object : TokenListener {
        override fun onToken(piece: String, token: Int) = f(piece, token)
    }

    private fun run(prompt: String?, ids: IntArray?, o: GenerateOptions, user: TokenListener?): Generation {
        val h = handle
        check(h != 0L) { "the generator is closed" }
        val text = StringBuilder()
        val tokens = ArrayList<Int>()
        val collect = object : TokenListener {
            override fun onToken(piece: String, token: Int): Boolean {
                text.append(piece)
                tokens.add(token)
                return user?.onToken(piece, token) ?: true
            }
        }
        val d = o.decoding
        val (code, layer, drafts, threshold) = when (d) {
            is Decoding.Plain -> Quad(0, 0, 0, 0f)
            is Decoding.Speculative -> Quad(1, d.exitLayer, d.draftTokens, 0f)
            is Decoding.Auto -> Quad(2, 0, 0, 0f)
            is Decoding.EarlyExit -> Quad(3, 0, 0, d.threshold)
        }
        val s = Native.generate(
            h, prompt, ids, o.maxTokens, o.temperature, o.topK, o.topP, o.seed, code, layer, drafts, threshold, collect
        )
        return Generation(
            text.toString(),
            tokens.toIntArray(),
            s[0].toInt(),
            s[2],
            s[3],
            StopReason.values()[s[4].toInt()],
            s[5],
            s[6]
        )
    }

    /** Stops a running [generate] after the token it is on (from any thread). */
    fun cancel() {
        val h = handle
        if (h != 0L) Native.generatorCancel(h)
    }

    /** Empties the context: the next prompt starts a new conversation. */
    fun reset() {
        val h = handle
        check(h != 0L) { "the generator is closed" }
        Native.generatorReset(h)
    }

    /** Frees the generator and its KV cache (idempotent). */
    @Synchronized
    override fun close() {
        val h = handle
        handle = 0
        if (h != 0L) Native.generatorFree(h)
    }
}

private data class Quad(val code: Int, val layer: Int, val drafts: Int, val threshold: Float)
