{{/* Names and labels shared by every template. */}}

{{- define "finetune-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "finetune-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "finetune-operator.labels" -}}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.trainerImage" -}}
{{- if .Values.trainer.image.digest -}}
{{- printf "%s@%s" .Values.trainer.image.repository .Values.trainer.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.reportURL" -}}
{{- $scheme := ternary "https" "http" .Values.progressTLS.enabled -}}
{{- printf "%s://%s.%s.svc:%v" $scheme (include "finetune-operator.fullname" .) .Release.Namespace .Values.service.progressPort -}}
{{- end -}}

{{- define "finetune-operator.serviceMonitorEnabled" -}}
{{- $enabled := .Values.metrics.serviceMonitor.enabled -}}
{{- if kindIs "invalid" $enabled -}}
{{- .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor" -}}
{{- else -}}
{{- $enabled -}}
{{- end -}}
{{- end -}}

{{/*
The image prefixes a FineTuneJob's spec.image may start with (jobPolicy), comma-separated: the
trainer image repository and jobPolicy.images; empty where jobPolicy.anyImage allows any.
*/}}
{{- define "finetune-operator.allowedImages" -}}
{{- if not .Values.jobPolicy.anyImage -}}
{{- $trainer := .Values.trainer.image.repository -}}
{{- join "," (concat (list (printf "%s:" $trainer) (printf "%s@" $trainer)) .Values.jobPolicy.images) -}}
{{- end -}}
{{- end }}
